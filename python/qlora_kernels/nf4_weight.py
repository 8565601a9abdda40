"""NF4Weight: a 4-bit NF4 weight in bitsandbytes' storage layout, readable and writable in place."""
import torch

from qlora_kernels.reference import nf4 as ref


class NF4Weight:
    """A `(out, in)` weight stored as NF4 codes, two per byte, with per-block scales.

    packed:    uint8 (ceil(out*in / 2),), element 2j in the high nibble of byte j
    shape:     logical (out, in)
    dtype:     the dtype dequantization returns (the original weight's)
    blocksize: elements per scale block, along the flattened row-major weight
    Scales, either plain (`double_quant=False`): absmax fp32 (nblocks,); or double-quantized:
    qabsmax uint8 (nblocks,), absmax2 fp32 (ceil(nblocks / nested_blocksize),), code2 fp32 (256,),
    offset fp32 0-d, meaning absmax = code2[qabsmax] * absmax2[b // nested_blocksize] + offset.
    """

    def __init__(self, packed, shape, dtype, blocksize, absmax=None, *, qabsmax=None, absmax2=None,
                 code2=None, offset=None, nested_blocksize=ref.NESTED_BLOCKSIZE):
        self.packed = packed
        self.shape = torch.Size(shape)
        self.dtype = dtype
        ref.check_blocksize(blocksize)
        self.blocksize = blocksize
        self.nested_blocksize = int(nested_blocksize)
        self._absmax, self.qabsmax, self.absmax2, self.code2, self.offset = absmax, qabsmax, absmax2, code2, offset
        if (absmax is None) == (qabsmax is None):
            raise ValueError("NF4Weight needs exactly one of absmax (plain) or qabsmax (double quant)")
        if len(self.shape) != 2:
            raise ValueError(f"NF4Weight shape must be (out, in), got {tuple(self.shape)}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"NF4Weight dtype (what dequantization returns) must be float32, float16 or bfloat16, "
                             f"got {dtype}")
        if packed.dtype != torch.uint8 or packed.numel() != (self.numel() + 1) // 2:
            raise ValueError(f"packed must be uint8 with {(self.numel() + 1) // 2} bytes for shape "
                             f"{tuple(self.shape)}, got {packed.dtype} with {packed.numel()}")
        # the kernels read the scales as raw fp32 / uint8 arrays beside packed: check what they will read
        nblocks = self.nblocks
        expected = [("qabsmax", qabsmax, torch.uint8, nblocks),
                    ("absmax2", absmax2, torch.float32, -(-nblocks // self.nested_blocksize)),
                    ("code2", code2, torch.float32, 256), ("offset", offset, torch.float32, 1)] \
            if qabsmax is not None else [("absmax", absmax, torch.float32, nblocks)]
        for name, t, dtype, numel in expected:
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.numel() != numel or t.device != packed.device:
                got = (f"{t.dtype} with {t.numel()} elements on {t.device}" if isinstance(t, torch.Tensor)
                       else type(t).__name__)
                raise ValueError(f"NF4Weight {name} must be {dtype} with {numel} elements on {packed.device} "
                                 f"(packed's device), got {got}")
        for name, t in [("packed", packed)] + [(name, t) for name, t, _, _ in expected]:
            if not t.is_contiguous():   # the kernels index raw pointers
                raise ValueError(f"NF4Weight {name} must be contiguous, got strides {t.stride()}")

    @property
    def double_quant(self) -> bool:
        return self.qabsmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nblocks(self) -> int:
        return -(-self.numel() // self.blocksize)

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def absmax(self) -> torch.Tensor:
        """The fp32 per-block scales (nblocks,) exactly as dequantization uses them."""
        if not self.double_quant:
            return self._absmax
        return ref.dequantize_absmax(self.qabsmax, self.absmax2, self.code2, self.offset, self.nested_blocksize)

    def scale_tensors(self):
        """(absmax or qabsmax, absmax2, code2, offset): the raw scale storage (None where unused)."""
        if self.double_quant:
            return self.qabsmax, self.absmax2, self.code2, self.offset
        return self._absmax, None, None, None

    def to(self, device) -> "NF4Weight":
        """A copy on `device` (self when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Weight(move(self.packed), self.shape, self.dtype, self.blocksize, move(self._absmax),
                         qabsmax=move(self.qabsmax), absmax2=move(self.absmax2), code2=move(self.code2),
                         offset=move(self.offset), nested_blocksize=self.nested_blocksize)

    @classmethod
    def from_bnb(cls, param, quant_state=None) -> "NF4Weight":
        """View a `bitsandbytes.nn.Params4bit` (or a packed tensor plus its QuantState) without copying.

        The packed bytes, absmax and nested state of the result share storage with bitsandbytes'.
        """
        qs = quant_state if quant_state is not None else getattr(param, "quant_state", None)
        if qs is None:
            raise ValueError("from_bnb needs a quantized Params4bit (its quant_state is None: move it to a "
                             "device or quantize it first)")
        if qs.quant_type != "nf4":
            raise ValueError(f"from_bnb supports quant_type 'nf4', got {qs.quant_type!r}")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError("from_bnb: this weight was repacked by bitsandbytes for its CPU kernels (an eval-mode "
                             "forward on a CPU with AVX512-BF16); read it before such a forward, or undo it with "
                             "bitsandbytes.functional._convert_weight_packed_for_cpu_inverse")
        packed = param.data if isinstance(param, torch.nn.Parameter) else param
        if not packed.is_contiguous():
            raise ValueError("from_bnb: packed storage must be contiguous")
        packed = packed.view(-1).view(torch.uint8)   # quant_storage may be another dtype (FSDP-QLoRA: bf16)
        shape = tuple(qs.shape)
        if qs.nested:
            return cls(packed, shape, qs.dtype, qs.blocksize, qabsmax=qs.absmax.view(-1),
                       absmax2=qs.state2.absmax, code2=qs.state2.code, offset=qs.offset,
                       nested_blocksize=qs.state2.blocksize)
        return cls(packed, shape, qs.dtype, qs.blocksize, qs.absmax.view(-1))

    def to_bnb(self):
        """(packed uint8 (ceil(n/2), 1), bitsandbytes QuantState) sharing this weight's storage."""
        from bitsandbytes.functional import QuantState

        code = ref.nf4_code(self.device)
        if self.double_quant:
            state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.nested_blocksize,
                                dtype=torch.float32)
            qs = QuantState(absmax=self.qabsmax, shape=self.shape, code=code, blocksize=self.blocksize,
                            quant_type="nf4", dtype=self.dtype, offset=self.offset, state2=state2)
        else:
            qs = QuantState(absmax=self._absmax, shape=self.shape, code=code, blocksize=self.blocksize,
                            quant_type="nf4", dtype=self.dtype)
        return self.packed.view(-1, 1), qs

    def __repr__(self):
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, device={self.device})")
