"""Per-sample auxiliary states z_k (and AL multipliers mu_k) of one boundary.

The store lives on the rank that reads the boundary (stage k owns boundary k, its input).
Rows are keyed by the dataset's sample ids, so row i is sample i in every epoch, whatever the
shuffle. States are kept at the DS resolution in the storage dtype (fp32, bf16 or fp16), on the
training device or in host memory (pinned when training on CUDA, so gathers and scatters can
be asynchronous copies). Arithmetic always happens in fp32 on the training device.
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class AuxStore:
    def __init__(self, num_samples: int, shape: tuple[int, ...], *, dtype: str = "fp32",
                 placement: str = "device", device: torch.device = torch.device("cpu"),
                 multipliers: bool = False):
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        host = placement == "host"
        self.store_device = torch.device("cpu") if host else self.device
        pin = host and self.device.type == "cuda"
        full = (num_samples, *shape)
        self.z = torch.zeros(full, dtype=self.dtype, device=self.store_device, pin_memory=pin)
        self.mu = (torch.zeros(full, dtype=self.dtype, device=self.store_device, pin_memory=pin)
                   if multipliers else None)

    @property
    def nbytes(self) -> int:
        n = self.z.numel() * self.z.element_size()
        if self.mu is not None:
            n += self.mu.numel() * self.mu.element_size()
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

    def put_z(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        self.z.index_copy_(0, self._rows(idx), values.to(self.store_device, self.dtype, non_blocking=True))

    def put_mu(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        if self.mu is not None:
            self.mu.index_copy_(0, self._rows(idx), values.to(self.store_device, self.dtype, non_blocking=True))

    def reset_mu(self) -> None:
        if self.mu is not None:
            self.mu.zero_()

    def mean_mu_norm(self) -> float:
        """Mean over samples of ||mu_i|| (0 without multipliers). Off the hot path."""
        if self.mu is None:
            return 0.0
        return float(self.mu.float().flatten(1).norm(dim=1).mean())

    def state_dict(self) -> dict:
        return {"z": self.z, "mu": self.mu}

    def load_state_dict(self, state: dict) -> None:
        self.z.copy_(state["z"])
        if self.mu is not None and state.get("mu") is not None:
            self.mu.copy_(state["mu"])
