// The 16 NF4 code values (bitsandbytes' table), shared by the CPU and CUDA kernels. No torch headers.
#pragma once

namespace qlora_kernels {

constexpr float kNF4Code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};
constexpr unsigned char kNF4Zero = 7;  // index of 0.0: the padding nibble
// The reciprocal scale is 1 / max(absmax, kMinAbsmax), as bitsandbytes: all-zero blocks get code 7, not NaN.
constexpr float kMinAbsmax = 1e-38f;

}  // namespace qlora_kernels
