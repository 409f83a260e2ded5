"""Per-sample auxiliary states z_k (and AL multipliers mu_k) of one boundary.

The store lives on the rank that reads the boundary (stage k owns boundary k, its input).
Rows are keyed by the dataset's sample ids, so row i is sample i in every epoch, whatever the
shuffle. States are kept at the DS resolution in the storage dtype (fp32, bf16 or fp16), on the
training device or in host memory (pinned when training on CUDA). Arithmetic always happens
in fp32 on the training device.

Host placement on CUDA, and why each copy is safe:

* device -> host (``put_z``/``put_mu``) is a *synchronous* copy. A ``non_blocking=True`` copy
  to the CPU returns a tensor whose bytes land later, when the stream reaches the copy; the
  ``index_copy_`` into the store that follows runs on the host at once and would read
  whatever was there before (stale or uninitialised rows, silently). The synchronous copy
  waits for the producing kernels and for the transfer, so the host rows are final when they
  are scattered.
* host -> device (``get_z``/``get_mu``) may stay ``non_blocking``: the gathered rows are an
  ordinary (pageable) host tensor, and CUDA copies a pageable source into its own staging
  buffer before the call returns, so the source may be freed or reused immediately; the
  device result is ordered on the current stream before any kernel that reads it.
* Nothing reads the store between a put and the next get except on the host, after the
  synchronous put has finished.

On the CPU (or with device placement) every copy is a no-op or a plain cast: same work as
before.
"""

from __future__ import annotations

import torch

from auxpar.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class AuxStore:
    def __init__(self, num_samples: int, shape: tuple[int, ...], *, dtype: str = "fp32",
                 placement: str = "device", device: torch.device = torch.device("cpu"),
                 multipliers: bool = False, inputs: bool = False):
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        host = placement == "host"
        self.store_device = torch.device("cpu") if host else self.device
        pin = host and self.device.type == "cuda"
        full = (num_samples, *shape)
        self.z = torch.zeros(full, dtype=self.dtype, device=self.store_device, pin_memory=pin)
        self.mu = (torch.zeros(full, dtype=self.dtype, device=self.store_device, pin_memory=pin)
                   if multipliers else None)
        # coupling.stage_input = "output": the stage's own input, the last output of the stage
        # below that arrived for each sample (z then only serves as that stage's target)
        self.x = (torch.zeros(full, dtype=self.dtype, device=self.store_device, pin_memory=pin)
                  if inputs else None)

    @property
    def nbytes(self) -> int:
        n = self.z.numel() * self.z.element_size()
        for extra in (self.mu, self.x):
            if extra is not None:
                n += extra.numel() * extra.element_size()
        return n

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        return idx if idx.device == self.store_device else idx.to(self.store_device)

    def get_z(self, idx: torch.Tensor) -> torch.Tensor:
        """z[idx] as fp32 on the training device."""
        return self.z.index_select(0, self._rows(idx)).to(self.device, torch.float32, non_blocking=True)

    def get_mu(self, idx: torch.Tensor) -> torch.Tensor | None:
        if self.mu is None:
            return None
        return self.mu.index_select(0, self._rows(idx)).to(self.device, torch.float32, non_blocking=True)

    def get_x(self, idx: torch.Tensor) -> torch.Tensor | None:
        """The stored stage inputs x[idx] (None unless the store keeps them)."""
        if self.x is None:
            return None
        return self.x.index_select(0, self._rows(idx)).to(self.device, torch.float32, non_blocking=True)

    def _to_store(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` in the store's dtype on the store's device, *complete* when this returns:
        a device->host copy is synchronous (see the module docstring); same device: a cast."""
        return values.to(self.store_device, self.dtype)

    def put_z(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        self.z.index_copy_(0, self._rows(idx), self._to_store(values))

    def put_mu(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        if self.mu is not None:
            self.mu.index_copy_(0, self._rows(idx), self._to_store(values))

    def put_x(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        if self.x is not None:
            self.x.index_copy_(0, self._rows(idx), self._to_store(values))

    def reset_mu(self) -> None:
        if self.mu is not None:
            self.mu.zero_()

    def mean_mu_norm(self) -> float:
        """Mean over samples of ||mu_i|| (0 without multipliers). Off the hot path."""
        if self.mu is None:
            return 0.0
        return float(self.mu.float().flatten(1).norm(dim=1).mean())

    def state_dict(self) -> dict:
        return {"z": self.z, "mu": self.mu, "x": self.x}

    def load_state_dict(self, state: dict) -> None:
        self.z.copy_(state["z"])
        if self.mu is not None and state.get("mu") is not None:
            self.mu.copy_(state["mu"])
        if self.x is not None:
            if state.get("x") is None:
                raise ConfigError("the checkpoint has no stored stage inputs (it was trained with "
                                 "coupling.stage_input = 'aux'); resume with the same coupling.stage_input")
            self.x.copy_(state["x"])
