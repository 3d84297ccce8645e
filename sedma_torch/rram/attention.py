"""`RRAMMultiheadAttention`: ``nn.MultiheadAttention`` whose projections run on crossbars.

``nn.MultiheadAttention`` never calls its projections' ``forward``: it hands
``in_proj_weight`` (or ``q/k/v_proj_weight``) and ``out_proj.weight`` to
``F.multi_head_attention_forward``, so converting ``out_proj`` alone changes nothing and
the in-projection stays digital. :class:`RRAMMultiheadAttention` keeps the digital
module's Parameters (same objects, same state-dict keys, an optimiser built before the
conversion still updates them) and reads them through :class:`~.layers.RRAMLinear`
children that share them:

* packed weights (``kdim == vdim == embed_dim``): one ``in_proj`` crossbar
  ``(embed_dim -> 3 * embed_dim)`` holding ``in_proj_weight``. The rows of every distinct
  input among query / key / value are read in one call of the whole packed crossbar and
  each projection keeps its third of the columns. Self-attention (``query is key is
  value``) reads each token once, as the digital packed projection; encoder-decoder
  attention (``key is value``) reads query and key rows, and three distinct inputs read
  all three, through all ``3 * embed_dim`` columns: the simulation (and the layer's
  ``rram_stats``: tile reads, ADC conversions) pays up to 3x the columns a projection
  needs, the price of keeping ``in_proj_weight`` one Parameter on one crossbar.
* separate weights (``kdim`` or ``vdim`` differ): ``q_proj``, ``k_proj``, ``v_proj``
  crossbars sharing ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``; each input is
  read once by its own crossbar.
* in-projection biases: the in-projection crossbars have no bias; the slices of the
  shared ``(3 * embed_dim,)`` Parameter ``in_proj_bias`` are added digitally after the
  reads (as ``RRAMLinear`` adds its bias), so gradients reach the original Parameter.
* ``out_proj``: an ``RRAMLinear`` sharing ``out_proj.weight`` and ``out_proj.bias``.

The attention itself (scores, masks, softmax, dropout, head averaging) is digital and
mirrors ``torch.nn.functional.multi_head_attention_forward`` step by step (its mask
canonicalisation and merging, ``is_causal`` handling and checks), so with an ideal
configuration the module computes what ``nn.MultiheadAttention`` computes, and gradients
are the digital ones (straight-through, see :mod:`.layers`). ``need_weights=False`` uses
``F.scaled_dot_product_attention`` as torch does. Nested tensors (torch's fast path) are
not supported.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import RRAMConfig
from .crossbar import CrossbarStats, derive_seed
from .linear import RRAMLinear
from .read_op import _check_config

_SHARED_PARAMETERS = (
    "in_proj_weight",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
    "in_proj_bias",
    "bias_k",
    "bias_v",
)
"""The Parameters of ``nn.MultiheadAttention`` outside ``out_proj`` (some may be None)."""


# ----- torch's mask helpers (``torch.nn.functional``, torch 2.x) ---------------------------
def _canonical_mask(
    mask: torch.Tensor | None,
    mask_name: str,
    other_type: torch.dtype | None,
    other_name: str,
    target_type: torch.dtype,
    check_other: bool = True,
) -> torch.Tensor | None:
    """A bool mask as an additive float mask (``True`` -> ``-inf``); float masks as given."""
    if mask is None:
        return None
    is_float = torch.is_floating_point(mask)
    if mask.dtype != torch.bool and not is_float:
        raise AssertionError(f"only bool and floating types of {mask_name} are supported")
    if check_other and other_type is not None and mask.dtype != other_type:
        warnings.warn(
            f"Support for mismatched {mask_name} and {other_name} "
            "is deprecated. Use same type for both instead.",
            stacklevel=3,
        )
    if not is_float:
        mask = torch.zeros_like(mask, dtype=target_type).masked_fill_(mask, float("-inf"))
    return mask


def _dtype_of(mask: torch.Tensor | None) -> torch.dtype | None:
    return None if mask is None else mask.dtype


def _shape_check(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    num_heads: int,
) -> bool:
    """``F._mha_shape_check``: validates the input ranks; True for batched (3-D) input."""
    if query.dim() == 3:
        if key.dim() != 3 or value.dim() != 3:
            raise AssertionError(
                "For batched (3-D) `query`, expected `key` and `value` to be 3-D"
                f" but found {key.dim()}-D and {value.dim()}-D tensors respectively"
            )
        if key_padding_mask is not None and key_padding_mask.dim() != 2:
            raise AssertionError(
                "For batched (3-D) `query`, expected `key_padding_mask` to be `None` or 2-D"
                f" but found {key_padding_mask.dim()}-D tensor instead"
            )
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise AssertionError(
                "For batched (3-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D"
                f" but found {attn_mask.dim()}-D tensor instead"
            )
        return True
    if query.dim() == 2:
        if key.dim() != 2 or value.dim() != 2:
            raise AssertionError(
                "For unbatched (2-D) `query`, expected `key` and `value` to be 2-D"
                f" but found {key.dim()}-D and {value.dim()}-D tensors respectively"
            )
        if key_padding_mask is not None and key_padding_mask.dim() != 1:
            raise AssertionError(
                "For unbatched (2-D) `query`, expected `key_padding_mask` to be `None` or 1-D"
                f" but found {key_padding_mask.dim()}-D tensor instead"
            )
        if attn_mask is not None:
            if attn_mask.dim() not in (2, 3):
                raise AssertionError(
                    "For unbatched (2-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D"
                    f" but found {attn_mask.dim()}-D tensor instead"
                )
            if attn_mask.dim() == 3:
                expected = (num_heads, query.shape[0], key.shape[0])
                if attn_mask.shape != expected:
                    raise AssertionError(
                        f"Expected `attn_mask` shape to be {expected} but got {attn_mask.shape}"
                    )
        return False
    raise AssertionError(
        "query should be unbatched 2D or batched 3D tensor but received "
        f"{query.dim()}-D query tensor"
    )


def _map_distinct(
    fn: Callable[[torch.Tensor], torch.Tensor], *tensors: torch.Tensor
) -> list[torch.Tensor]:
    """``fn`` of each tensor, applied once per distinct object, so that ``query is key``
    (self-attention) survives reshapes."""
    done: list[tuple[torch.Tensor, torch.Tensor]] = []
    out = []
    for t in tensors:
        for src, res in done:
            if t is src:
                out.append(res)
                break
        else:
            res = fn(t)
            done.append((t, res))
            out.append(res)
    return out


def _child_seed(seed: int | None, name: str) -> int | None:
    return None if seed is None else derive_seed(seed, "mha", name)


class RRAMMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with all its projections computed on simulated crossbars.

    Args: as ``nn.MultiheadAttention`` plus ``config`` (an :class:`RRAMConfig`, shared by
    the projections) and ``seed`` (the crossbar children's seeds derive from it and their
    names; None: from the construction order, as ``RRAMLinear``). Usually built from a
    digital module with :meth:`from_mha`. Children (all :class:`RRAMLinear`): ``in_proj``
    (packed weights) or ``q_proj`` / ``k_proj`` / ``v_proj`` (``kdim`` / ``vdim`` differ
    from ``embed_dim``), and ``out_proj``. See the module docstring for the read cost of
    cross-attention with packed weights and for how biases are handled.

    ``forward`` has ``nn.MultiheadAttention.forward``'s signature, semantics and return
    values (without its fused fast path and nested tensors).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        config: RRAMConfig | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            embed_dim,
            num_heads,
            dropout=dropout,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            kdim=kdim,
            vdim=vdim,
            batch_first=batch_first,
            device=device,
            dtype=dtype,
        )
        self.rram_config = _check_config(config)
        self.crossbar_seed = seed
        """The seed the children's seeds derive from (None: construction order)."""
        self._build_crossbars()

    # ----- construction -----------------------------------------------------------------
    def _build_crossbars(self) -> None:
        """(Re-)create the crossbar children around the current Parameters."""
        cfg, seed = self.rram_config, self.crossbar_seed

        def crossbar(name: str, weight: nn.Parameter, bias: nn.Parameter | None) -> RRAMLinear:
            out_f, in_f = weight.shape
            # built on the meta device, then given the shared Parameters: nothing is copied
            layer = RRAMLinear(
                in_f,
                out_f,
                bias=bias is not None,
                device="meta",
                config=cfg,
                seed=_child_seed(seed, name),
            )
            layer.weight = weight
            layer.bias = bias  # type: ignore[assignment]
            return layer.train(self.training)

        out = self._modules.pop("out_proj")  # re-added last: in-projection first
        assert out is not None
        if self._qkv_same_embed_dim:
            self.in_proj = crossbar("in_proj", self.in_proj_weight, None)
            for name in ("q_proj", "k_proj", "v_proj"):
                self._modules.pop(name, None)
        else:
            self._modules.pop("in_proj", None)
            self.q_proj = crossbar("q_proj", self.q_proj_weight, None)
            self.k_proj = crossbar("k_proj", self.k_proj_weight, None)
            self.v_proj = crossbar("v_proj", self.v_proj_weight, None)
        self.out_proj = crossbar("out_proj", out.weight, out.bias)  # type: ignore[assignment, arg-type]

    @classmethod
    def from_mha(
        cls,
        mha: nn.MultiheadAttention,
        config: RRAMConfig | None = None,
        seed: int | None = None,
        program: bool = True,
    ) -> RRAMMultiheadAttention:
        """``mha`` on crossbars: a module holding the *same* Parameter objects as ``mha``
        (``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``, ``bias_k``,
        ``bias_v``, ``out_proj.weight`` / ``.bias``) and crossbar children sharing them;
        programmed now unless ``program=False`` (then on the first forward pass)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_mha expects nn.MultiheadAttention, got {type(mha).__name__}")
        if isinstance(mha, RRAMMultiheadAttention):
            raise TypeError("from_mha: the module is already an RRAMMultiheadAttention")
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            add_zero_attn=mha.add_zero_attn,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device="meta",  # replaced by mha's Parameters below: nothing allocated
            config=config,
            seed=seed,
        )
        _share_parameters(new, mha)
        new._build_crossbars()
        new.train(mha.training)
        if program:
            new.program_()
        return new

    def digital_twin(self) -> nn.MultiheadAttention:
        """The ``nn.MultiheadAttention`` this module simulates, sharing its Parameters."""
        twin = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            dropout=self.dropout,
            bias=self.in_proj_bias is not None,
            add_zero_attn=self.add_zero_attn,
            kdim=self.kdim,
            vdim=self.vdim,
            batch_first=self.batch_first,
            device="meta",
        )
        _share_parameters(twin, self)
        return twin.train(self.training)

    # ----- crossbars ----------------------------------------------------------------------
    def crossbar_layers(self) -> dict[str, RRAMLinear]:
        """The crossbar children by name: ``in_proj`` or ``q_proj``, ``k_proj``,
        ``v_proj``; then ``out_proj``."""
        names = ("in_proj",) if self._qkv_same_embed_dim else ("q_proj", "k_proj", "v_proj")
        return {name: getattr(self, name) for name in (*names, "out_proj")}

    def reconfigure_(self, config: RRAMConfig) -> RRAMMultiheadAttention:
        """Every crossbar child on ``config`` from now on (``RRAMLinear.reconfigure_``: a new
        chip, programmed at the next forward pass). Returns the module."""
        self.rram_config = _check_config(config)
        for layer in self.crossbar_layers().values():
            layer.reconfigure_(self.rram_config)
        return self

    def program_(self, from_scratch: bool = False) -> dict[str, CrossbarStats]:
        """(Re-)program every crossbar child now; returns their stats by name."""
        return {
            name: layer.program_(from_scratch=from_scratch)
            for name, layer in self.crossbar_layers().items()
        }

    @property
    def is_programmed(self) -> bool:
        """True when every crossbar child holds its current digital weights."""
        return all(layer.is_programmed for layer in self.crossbar_layers().values())

    # ----- forward --------------------------------------------------------------------------
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward`` (same arguments, shapes and outputs)."""
        if query.is_nested or key.is_nested or value.is_nested:
            raise AssertionError("RRAMMultiheadAttention does not support NestedTensor inputs")
        is_batched = query.dim() == 3
        key_padding_mask = _canonical_mask(
            key_padding_mask,
            "key_padding_mask",
            _dtype_of(attn_mask),
            "attn_mask",
            query.dtype,
        )
        attn_mask = _canonical_mask(
            attn_mask, "attn_mask", None, "", query.dtype, check_other=False
        )
        transpose = self.batch_first and is_batched
        if transpose:  # to (L, N, E), keeping "query is key is value"
            query, key, value = _map_distinct(lambda t: t.transpose(1, 0), query, key, value)
        out, weights = self._attention(
            query,
            key,
            value,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            is_causal,
        )
        return (out.transpose(1, 0) if transpose else out), weights

    def _in_projection(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (each ``(..., embed_dim)``) from the crossbar reads, plus the biases."""
        e = self.embed_dim
        if self._qkv_same_embed_dim:
            # rows of each distinct input, read together through the packed crossbar
            inputs: list[torch.Tensor] = []
            slot = []
            for t in (query, key, value):
                match = next((i for i, u in enumerate(inputs) if u is t), None)
                if match is None:
                    match = len(inputs)
                    inputs.append(t)
                slot.append(match)
            rows = [t.reshape(-1, t.shape[-1]) for t in inputs]
            packed = self.in_proj(rows[0] if len(rows) == 1 else torch.cat(rows))
            reads = packed.split([r.shape[0] for r in rows])
            proj = [
                reads[slot[i]][:, i * e : (i + 1) * e].reshape(*t.shape[:-1], e)
                for i, t in enumerate((query, key, value))
            ]
        else:
            sizes = (query.size(-1), key.size(-1), value.size(-1))
            layers = (self.q_proj, self.k_proj, self.v_proj)
            for what, layer, size in zip(("query", "key", "value"), layers, sizes, strict=True):
                if tuple(layer.weight.shape) != (e, size):
                    raise AssertionError(
                        f"expecting {what} weights shape of {(e, size)}, "
                        f"but got {layer.weight.shape}"
                    )
            proj = [layer(t) for layer, t in zip(layers, (query, key, value), strict=True)]
        if self.in_proj_bias is not None:
            biases = self.in_proj_bias.chunk(3)
            proj = [p + b.to(p.dtype) for p, b in zip(proj, biases, strict=True)]
        q, k, v = proj
        return q, k, v

    def _attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        need_weights: bool,
        attn_mask: torch.Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``F.multi_head_attention_forward`` (sequence-first inputs) with the projections
        read from the crossbars."""
        num_heads = self.num_heads
        is_batched = _shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
        if not is_batched:  # pretend batched, squeeze at the end
            query, key, value = _map_distinct(lambda t: t.unsqueeze(1), query, key, value)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)

        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        key_padding_mask = _canonical_mask(
            key_padding_mask,
            "key_padding_mask",
            _dtype_of(attn_mask),
            "attn_mask",
            query.dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. "
                "You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            # scaled_dot_product_attention applies the causal mask itself
            attn_mask = None
        else:
            attn_mask = _canonical_mask(
                attn_mask, "attn_mask", None, "", query.dtype, check_other=False
            )
            if key_padding_mask is not None:
                is_causal = False  # the merged mask is no longer causal

        if embed_dim != self.embed_dim:
            raise AssertionError(
                f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}"
            )
        head_dim = embed_dim // num_heads
        if head_dim * num_heads != embed_dim:
            raise AssertionError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")
        if not self._qkv_same_embed_dim:
            if key.shape[:2] != value.shape[:2]:
                raise AssertionError(
                    f"key's sequence and batch dims {key.shape[:2]} do not match "
                    f"value's {value.shape[:2]}"
                )
        elif key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")

        q, k, v = self._in_projection(query, key, value)

        if attn_mask is not None:  # to 3-D
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                        f"{(tgt_len, src_len)}."
                    )
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                        f"{(bsz * num_heads, tgt_len, src_len)}."
                    )
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        elif self.bias_k is not None:
            raise AssertionError("bias_k is set but bias_v is None")
        elif self.bias_v is not None:
            raise AssertionError("bias_v is set but bias_k is None")

        # (batch * heads, sequence, head_dim)
        q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)

        if self.add_zero_attn:
            zeros = (bsz * num_heads, 1, head_dim)
            k = torch.cat([k, torch.zeros(zeros, dtype=k.dtype, device=k.device)], dim=1)
            v = torch.cat([v, torch.zeros(zeros, dtype=v.dtype, device=v.device)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))

        src_len = k.size(1)
        if key_padding_mask is not None:  # merge into attn_mask
            if key_padding_mask.shape[0] != bsz:
                raise AssertionError(
                    f"Expected key_padded_mask.shape[0] to be {bsz}, "
                    f"but got {key_padding_mask.shape[0]}"
                )
            if key_padding_mask.shape[1] != src_len:
                raise AssertionError(
                    f"Expected key_padded_mask.shape[1] to be {src_len}, "
                    f"but got {key_padding_mask.shape[1]}"
                )
            key_padding_mask = (
                key_padding_mask.view(bsz, 1, 1, src_len)
                .expand(-1, num_heads, -1, -1)
                .reshape(bsz * num_heads, 1, src_len)
            )
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask

        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
            if is_causal and attn_mask is None:
                raise AssertionError("FIXME: is_causal not implemented for need_weights")
            if attn_mask is not None:
                scores = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                scores = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v)
            out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = self.out_proj(out).view(tgt_len, bsz, -1)
            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                return out.squeeze(1), weights.squeeze(0)
            return out, weights

        if attn_mask is not None:  # (N * heads, L, S) -> (N, heads, L, S) for SDPA
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.reshape(bsz, num_heads, tgt_len, head_dim)
        k = k.reshape(bsz, num_heads, src_len, head_dim)
        v = v.reshape(bsz, num_heads, src_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = self.out_proj(out).view(tgt_len, bsz, -1)
        return (out if is_batched else out.squeeze(1)), None

    def extra_repr(self) -> str:
        cfg = self.rram_config
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"batch_first={self.batch_first}, material={cfg.device.name}"
        )


def _share_parameters(dst: nn.MultiheadAttention, src: nn.MultiheadAttention) -> None:
    """Give ``dst`` (a shell built on the meta device without ``add_bias_kv``: normal_ on
    meta tensors costs seconds the first time) the Parameter objects of ``src``, outside
    and inside ``out_proj``; ``bias_k`` / ``bias_v`` are registered here when ``src`` has
    them."""
    for name in _SHARED_PARAMETERS:
        setattr(dst, name, getattr(src, name))
    dst.out_proj.weight = src.out_proj.weight
    dst.out_proj.bias = src.out_proj.bias


__all__ = ["RRAMMultiheadAttention"]
