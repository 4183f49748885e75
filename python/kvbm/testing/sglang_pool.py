"""A CPU host pool with SGLang's MHA host pool layouts (MHATokenToKVPoolHost, sglang 0.5.23):
the attributes a HiCache storage backend reads (layout, page_size, layer_num, head_num,
head_dim, dtype, kv_buffer) and the flat-page accessors of the non-zero-copy path. SGLang's own
class needs its device pool and CUDA kernels to construct; its buffer dimensions are:

- layer_first:       (2, layer_num, size, head_num, head_dim)
- page_first:        (2, size, layer_num, head_num, head_dim)
- page_first_direct: (2, size // page_size, layer_num, page_size, head_num, head_dim)
"""

from __future__ import annotations

import torch


class HostPool:
    def __init__(self, layout: str, *, size: int, layers: int, heads: int, head_dim: int, page_size: int,
                 dtype=torch.float16):
        self.layout, self.size, self.page_size = layout, size, page_size
        self.layer_num, self.head_num, self.head_dim, self.dtype = layers, heads, head_dim, dtype
        if layout == "layer_first":
            dims = (2, layers, size, heads, head_dim)
        elif layout == "page_first":
            dims = (2, size, layers, heads, head_dim)
        elif layout == "page_first_direct":
            dims = (2, size // page_size, layers, page_size, heads, head_dim)
        else:
            raise ValueError(layout)
        self.kv_buffer = torch.zeros(dims, dtype=dtype)

    def token_kv(self, token: int, layer: int, kv: int) -> torch.Tensor:
        """The [heads, head_dim] KV of one token index, whatever the layout."""
        if self.layout == "layer_first":
            return self.kv_buffer[kv, layer, token]
        if self.layout == "page_first":
            return self.kv_buffer[kv, token, layer]
        return self.kv_buffer[kv, token // self.page_size, layer, token % self.page_size]

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        if self.layout == "layer_first":
            page = self.kv_buffer[:, :, index:index + self.page_size]
        elif self.layout == "page_first":
            page = self.kv_buffer[:, index:index + self.page_size]
        else:
            page = self.kv_buffer[:, index // self.page_size:index // self.page_size + 1]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros((2, self.layer_num, self.page_size, self.head_num, self.head_dim), dtype=self.dtype).flatten()

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        if self.layout == "layer_first":
            self.kv_buffer[:, :, index:index + self.page_size] = data_page.reshape(
                2, self.layer_num, self.page_size, self.head_num, self.head_dim)
        elif self.layout == "page_first":
            self.kv_buffer[:, index:index + self.page_size] = data_page.reshape(
                2, self.page_size, self.layer_num, self.head_num, self.head_dim)
        else:
            p = index // self.page_size
            self.kv_buffer[:, p:p + 1] = data_page.reshape(
                2, 1, self.layer_num, self.page_size, self.head_num, self.head_dim)
