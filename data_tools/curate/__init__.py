"""Curation before training: CLIP-score filtering, near-duplicate removal, decontamination.

    score.py     image-text cosine + embeddings of every sample (`clip-data score`)
    scoredir.py  reading a score directory and checking it belongs to a shard set
    rewrite.py   copying the kept samples of each shard into new shards, resumably
    filter.py    thresholds on score, caption words and image side (`clip-data filter`)
    dedup.py     exact/near duplicates and eval decontamination (`clip-data dedup`)
    report.py    the PNG histogram and the sample lists of a filter/dedup report

`data_tools` imports neither `clip_train` nor `clip_eval`: the API takes an encoder object
(`encode_image`, `encode_text`, `tokenizer`, `preprocess`); only the CLI loads one.
"""
