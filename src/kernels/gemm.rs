//! The column-major GEMM descriptor that cuBLASLt takes (`cuda::gemm`), outside the `cuda`
//! feature so that the descriptors the CUDA code builds can be checked on the host against
//! [`reference`], which computes what cuBLASLt would.

/// A column-major GEMM D (m × n, leading dimension ldd) = op(A) · op(B), with op(A) m × k and
/// op(B) k × n; `lda`/`ldb` are the stored matrices' leading dimensions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Gemm {
    pub transa: bool,
    pub transb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldd: usize,
}

/// What cuBLASLt computes for `g` on host buffers: D = op(A) · op(B), or D += … when
/// `accumulate`, every matrix column-major from the slice's start.
#[cfg(test)]
pub(crate) fn reference(g: &Gemm, a: &[f32], b: &[f32], d: &mut [f32], accumulate: bool) {
    for j in 0..g.n {
        for i in 0..g.m {
            let mut s = 0.0;
            for p in 0..g.k {
                let av = if g.transa {
                    a[p + i * g.lda]
                } else {
                    a[i + p * g.lda]
                };
                let bv = if g.transb {
                    b[j + p * g.ldb]
                } else {
                    b[p + j * g.ldb]
                };
                s += av * bv;
            }
            let at = i + j * g.ldd;
            d[at] = if accumulate { d[at] + s } else { s };
        }
    }
}
