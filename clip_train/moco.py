"""The moco term: image-text InfoNCE against momentum keys, the batch's and a queue of past ones.

MoCo (He et al., 2020) for image-text pairs, as ALBEF's (Li et al., 2021) contrastive loss with
momentum encoders and queues, without its distillation. Momentum (EMA) copies of both towers,
projections included, embed the batch once more, without a graph: these are the keys. Online
image queries are scored against the momentum text keys of the whole batch (every process's)
followed by a queue of past text keys, online text queries against the image keys and the image
queue; cross-entropy with the matching key as the target, symmetric, at the model's learned
temperature (or a fixed `temperature`).

State and its order, once per optimiser step (`after_step`, never per micro-batch): the momentum
towers move towards the just-updated towers, then the keys this step used (gathered from every
process, so all queues stay identical) enter the queues, first in, first out. The queues start
empty and fill over the first `queue_size / global batch` steps; until then only the filled part
is used. Keys carry no gradient, so each process averages over its own rows and DDP's mean of
the gradients is the gradient of one process on the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip_train.distributed import gather_features
from clip_train.momentum import MomentumCopy


class KeyQueue(nn.Module):
    """The last `size` keys pushed, in a ring of slots (first in, first out); starts empty."""

    def __init__(self, size: int, dim: int, device: torch.device | str | None = None):
        super().__init__()
        self.size = size
        self.register_buffer("keys", torch.zeros(size, dim, device=device))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64, device=device))

    def __len__(self) -> int:
        return min(int(self.count), self.size)

    def filled(self) -> torch.Tensor:
        """The keys held, by slot (the oldest is overwritten next once the ring is full)."""
        return self.keys[: len(self)]

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        if keys.shape[0] > self.size:
            raise ValueError(f"cannot push {keys.shape[0]} keys into a queue of {self.size}")
        slots = (self.count + torch.arange(keys.shape[0], device=self.keys.device)) % self.size
        self.keys[slots] = keys.detach().to(self.keys.dtype)
        self.count += keys.shape[0]


class MoCo(nn.Module):
    """The moco loss term; `attach(model)` gives it its momentum towers and queues."""

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        queue_size: int = 4096,
        momentum: float = 0.995,
        temperature: float | None = None,
        **_: object,
    ):
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.queue_size, self.momentum, self.temperature = queue_size, momentum, temperature
        # What it reads: the learned temperature only when no fixed one is set.
        self.needs = frozenset({"momentum"} | ({"logit_scale"} if temperature is None else set()))
        self.towers: MomentumCopy | None = None
        self.image_queue: KeyQueue | None = None
        self.text_queue: KeyQueue | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def attach(self, model: nn.Module, device: torch.device | str | None = None) -> None:
        """Momentum copies of `model`'s towers (as they are now) and empty queues, on `device`."""
        device = next(model.parameters()).device if device is None else device
        towers = nn.ModuleDict({"visual": model.visual, "text": model.text})
        self.towers = MomentumCopy(towers, self.momentum).to(device)
        dim = model.cfg.embed_dim
        self.image_queue = KeyQueue(self.queue_size, dim, device)
        self.text_queue = KeyQueue(self.queue_size, dim, device)

    def _attached(self) -> MomentumCopy:
        if self.towers is None:
            raise ValueError("the moco term has no momentum towers: call attach(model) first")
        return self.towers

    @torch.no_grad()
    def targets(
        self, images: torch.Tensor, tokens: torch.Tensor, images_2: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The momentum keys of a (micro-)batch, normalised, without a graph (`images_2` unread)."""
        towers = self._attached().module
        return {
            "momentum_image_features": F.normalize(towers["visual"](images), dim=-1),
            "momentum_text_features": F.normalize(towers["text"](tokens), dim=-1),
        }

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        momentum_image_features: torch.Tensor | None = None,
        momentum_text_features: torch.Tensor | None = None,
        **_: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        self._attached()
        if momentum_image_features is None or momentum_text_features is None:
            raise ValueError("the moco term needs the momentum keys of the batch (targets)")
        batch = image_features.shape[0]
        image_keys = gather_features(
            momentum_image_features.detach(), self.rank, self.world_size, False
        )
        text_keys = gather_features(
            momentum_text_features.detach(), self.rank, self.world_size, False
        )
        scale = logit_scale if self.temperature is None else 1.0 / self.temperature
        labels = torch.arange(batch, device=image_features.device) + self.rank * batch
        text_columns = torch.cat(
            [text_keys.to(self.text_queue.keys.dtype), self.text_queue.filled()]
        )
        image_columns = torch.cat(
            [image_keys.to(self.image_queue.keys.dtype), self.image_queue.filled()]
        )
        loss_i2t = F.cross_entropy(
            scale * image_features @ text_columns.to(image_features.dtype).T, labels
        )
        loss_t2i = F.cross_entropy(
            scale * text_features @ image_columns.to(text_features.dtype).T, labels
        )
        self._pending = (image_keys, text_keys)  # enqueued by after_step, once the step is taken
        return {"loss": (loss_i2t + loss_t2i) / 2, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}

    @torch.no_grad()
    def after_step(self) -> None:
        """After the optimiser step: EMA update of the momentum towers, then this step's keys
        (every process's, gathered in `forward`) into the queues."""
        towers = self._attached()
        if self._pending is None:
            raise RuntimeError("moco after_step without a forward since the last step")
        towers.update()
        image_keys, text_keys = self._pending
        self.image_queue.push(image_keys)
        self.text_queue.push(text_keys)
        self._pending = None
