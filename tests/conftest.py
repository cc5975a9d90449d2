import os

# Tests run on the CPU with two threads at most: CI has 2 cores and the tests must not
# oversubscribe them when DataLoader workers are used.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
