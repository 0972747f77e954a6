//! Typed device views: the matrices an engine hands to [`DoraLinear`](super::DoraLinear).
//!
//! A [`DevView`] (input) or [`DevViewMut`] (output) is a row-major matrix `[rows, cols]` whose
//! rows lie `ld` elements apart, in device memory of one device, with the dtype of `T`
//! (`f32`, `f16`, `bf16`). Views are made by the backend from its typed slices
//! ([`Backend::view`](crate::backend::Backend::view), and on CUDA also from cudarc's
//! `CudaView`/`CudaViewMut`), so the common case needs no `unsafe`; an engine with its own
//! allocator uses the raw door, [`DevView::from_raw`].
//!
//! Nothing is checked when a view is made: every call checks each view it gets (device,
//! shape, length, alignment, and that no output overlaps an input) and names the tensor in a
//! one-line [`ErrorKind::InvalidInput`](crate::error::ErrorKind::InvalidInput) error.

use crate::backend::{DevPtr, DeviceId, Elem, MemoryInfo};
use crate::error::{ensure_input, invalid};
use anyhow::Result;
use std::marker::PhantomData;

/// The shape of a row-major matrix view: `rows × cols`, rows `ld` elements apart (`ld ≥ cols`;
/// `ld > cols` for a column slice of a wider matrix, e.g. q, k or v of a fused QKV output).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatShape {
    /// Rows (tokens for activations).
    pub rows: usize,
    /// Columns (features).
    pub cols: usize,
    /// Row stride in elements.
    pub ld: usize,
}

impl MatShape {
    /// A contiguous `rows × cols` matrix (`ld = cols`).
    pub fn new(rows: usize, cols: usize) -> MatShape {
        MatShape {
            rows,
            cols,
            ld: cols,
        }
    }

    /// A `rows × cols` matrix whose rows are `ld` elements apart.
    pub fn strided(rows: usize, cols: usize, ld: usize) -> MatShape {
        MatShape { rows, cols, ld }
    }

    /// Elements from the first to one past the last (0 for an empty matrix).
    pub fn span(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            // Saturating: a span past usize::MAX is longer than any memory, so it is refused
            // as too short for its memory rather than wrapped.
            (self.rows - 1)
                .saturating_mul(self.ld)
                .saturating_add(self.cols)
        }
    }
}

impl std::fmt::Display for MatShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}, {}]", self.rows, self.cols)?;
        if self.ld != self.cols {
            write!(f, " with row stride {}", self.ld)?;
        }
        Ok(())
    }
}

/// What keeps cudarc's stream ordering for a view (see [`Backend::view`](crate::backend::Backend::view)).
pub(crate) enum Guard<'a> {
    /// Nothing to record (the emulator, raw views, sub-views of a guarded view).
    None,
    /// Records cudarc's read or write event on the backend's stream when dropped.
    #[cfg(feature = "cuda")]
    Cuda(#[allow(dead_code)] cudarc::driver::SyncOnDrop<'a>),
    #[allow(dead_code)]
    Phantom(PhantomData<&'a ()>),
}

/// A view checked for one call: its address, row stride and byte range.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Checked {
    pub ptr: DevPtr,
    pub ld: usize,
    /// Bytes `[lo, hi)` the call may touch.
    pub lo: u64,
    pub hi: u64,
}

impl Checked {
    /// True when the two byte ranges share a byte.
    pub fn overlaps(&self, o: &Checked) -> bool {
        self.lo < o.hi && o.lo < self.hi && self.hi > self.lo && o.hi > o.lo
    }
}

/// Checks a view's memory against what a call needs, naming `name`.
pub(crate) fn check_memory(
    name: &str,
    mem: &MemoryInfo,
    shape: MatShape,
    device: DeviceId,
    rows: usize,
    cols: usize,
) -> Result<Checked> {
    let region = Region {
        ptr: mem.ptr,
        len: mem.len,
        device: mem.device,
        elem_bytes: mem.dtype.size(),
        elem: mem.dtype.name(),
    };
    check_region(name, &region, shape, device, rows, cols)
}

/// Device memory as the checks see it: `len` elements of `elem_bytes` bytes each (named
/// `elem` in errors: a dtype, or `i32` for slot indices) at `ptr` on `device`.
pub(crate) struct Region {
    pub ptr: DevPtr,
    pub len: usize,
    pub device: DeviceId,
    pub elem_bytes: usize,
    pub elem: &'static str,
}

/// Checks `mem` against a `rows × cols` operand of layout `shape` on `device`, naming `name`:
/// device, shape, row stride, alignment to the element size, null address, length.
pub(crate) fn check_region(
    name: &str,
    mem: &Region,
    shape: MatShape,
    device: DeviceId,
    rows: usize,
    cols: usize,
) -> Result<Checked> {
    ensure_input!(
        mem.device == device,
        "{name}: memory of {}, but the layer runs on {device}",
        mem.device
    );
    ensure_input!(
        shape.rows == rows && shape.cols == cols,
        "{name}: shape {shape}, expected [{rows}, {cols}]"
    );
    ensure_input!(
        shape.ld >= shape.cols,
        "{name}: row stride {} below its {} columns",
        shape.ld,
        shape.cols
    );
    let size = mem.elem_bytes;
    ensure_input!(
        mem.ptr.0 % size as u64 == 0,
        "{name}: address {:#x} is not aligned to its {}-byte {} elements",
        mem.ptr.0,
        size,
        mem.elem
    );
    ensure_input!(mem.ptr.0 != 0, "{name}: null device address");
    let span = shape.span();
    ensure_input!(
        span <= mem.len,
        "{name}: too short: {shape} needs {span} elements, the view has {}",
        mem.len
    );
    let lo = mem.ptr.0;
    Ok(Checked {
        ptr: mem.ptr,
        ld: shape.ld,
        lo,
        hi: lo + (span * size) as u64,
    })
}

/// Fails when output `out` overlaps input `input` (names both).
pub(crate) fn check_disjoint(
    out_name: &str,
    out: &Checked,
    in_name: &str,
    input: &Checked,
) -> Result<()> {
    if out.overlaps(input) {
        invalid!(
            "{out_name} overlaps {in_name} (bytes {:#x}..{:#x} and {:#x}..{:#x}): an output may \
             not share memory with an input (finish a base product in place with BaseResult::InPlace)",
            out.lo,
            out.hi,
            input.lo,
            input.hi
        );
    }
    Ok(())
}

/// Sub-view arithmetic shared by both view kinds.
fn sub(
    mem: &MemoryInfo,
    shape: MatShape,
    row0: usize,
    col0: usize,
    sub: MatShape,
) -> Result<MemoryInfo> {
    let fits = |first: usize, n: usize, all: usize| first.checked_add(n).is_some_and(|e| e <= all);
    ensure_input!(
        fits(row0, sub.rows, shape.rows) && fits(col0, sub.cols, shape.cols),
        "sub-view [{row0}.., {col0}..] {sub} outside a {shape} view"
    );
    let off = row0.checked_mul(shape.ld).and_then(|o| o.checked_add(col0));
    let off_bytes = off.and_then(|o| o.checked_mul(mem.dtype.size()));
    let (Some(off), Some(off_bytes)) = (off, off_bytes) else {
        crate::error::invalid!("sub-view [{row0}.., {col0}..] of a {shape} view: offset overflows");
    };
    Ok(MemoryInfo {
        ptr: mem.ptr.offset(off_bytes),
        len: mem.len.saturating_sub(off),
        dtype: mem.dtype,
        device: mem.device,
    })
}

/// An input matrix on the device, typed by its element `T` (see the module doc).
pub struct DevView<'a, T: Elem> {
    mem: MemoryInfo,
    shape: MatShape,
    _guard: Guard<'a>,
    _t: PhantomData<&'a [T]>,
}

/// An output matrix on the device, typed by its element `T`; borrowing its memory mutably, so
/// safe code cannot hand the same slice in as an input as well.
pub struct DevViewMut<'a, T: Elem> {
    mem: MemoryInfo,
    shape: MatShape,
    _guard: Guard<'a>,
    _t: PhantomData<&'a mut [T]>,
}

macro_rules! view_common {
    ($ty:ident) => {
        impl<'a, T: Elem> $ty<'a, T> {
            /// Called by the backends: `len` elements at `ptr` on `device`.
            pub(crate) fn with_guard(
                ptr: DevPtr,
                len: usize,
                device: DeviceId,
                shape: MatShape,
                guard: Guard<'a>,
            ) -> Self {
                Self {
                    mem: MemoryInfo {
                        ptr,
                        len,
                        dtype: T::DTYPE,
                        device,
                    },
                    shape,
                    _guard: guard,
                    _t: PhantomData,
                }
            }

            /// The raw door for engines with their own allocators: `len` elements of `T` at
            /// `ptr` on `device`, seen as the matrix `shape`. No cudarc events are waited on or
            /// recorded: the caller orders its streams itself.
            ///
            /// # Safety
            /// `ptr..ptr + len·size_of::<T>()` must be device memory of `device`, valid for
            /// reads (and for writes, for an output view) for all of `'a`, and not written by
            /// anything else while a call that got this view runs.
            pub unsafe fn from_raw(
                ptr: DevPtr,
                len: usize,
                device: DeviceId,
                shape: MatShape,
            ) -> Self {
                Self::with_guard(ptr, len, device, shape, Guard::None)
            }

            /// The matrix shape.
            pub fn shape(&self) -> MatShape {
                self.shape
            }

            /// Where the view's memory lies (address, length in elements, dtype, device).
            pub fn memory(&self) -> MemoryInfo {
                self.mem
            }

            /// Checks the view for one call, naming it `name` in any error.
            pub(crate) fn check(
                &self,
                name: &str,
                device: DeviceId,
                rows: usize,
                cols: usize,
            ) -> Result<Checked> {
                check_memory(name, &self.mem, self.shape, device, rows, cols)
            }
        }
    };
}

view_common!(DevView);
view_common!(DevViewMut);

impl<T: Elem> DevView<'_, T> {
    /// Columns `start..start + width` of every row: a `[rows, width]` view with this view's
    /// row stride (the q, k or v slice of a fused QKV matrix).
    ///
    /// # Errors
    /// The columns lie outside the view.
    pub fn columns(&self, start: usize, width: usize) -> Result<DevView<'_, T>> {
        let shape = MatShape::strided(self.shape.rows, width, self.shape.ld);
        let mem = sub(&self.mem, self.shape, 0, start, shape)?;
        Ok(DevView::with_guard(
            mem.ptr,
            mem.len,
            mem.device,
            shape,
            Guard::None,
        ))
    }

    /// Rows `start..start + count`: a `[count, cols]` view (the first tokens of a buffer sized
    /// for the largest batch).
    ///
    /// # Errors
    /// The rows lie outside the view.
    pub fn rows(&self, start: usize, count: usize) -> Result<DevView<'_, T>> {
        let shape = MatShape::strided(count, self.shape.cols, self.shape.ld);
        let mem = sub(&self.mem, self.shape, start, 0, shape)?;
        Ok(DevView::with_guard(
            mem.ptr,
            mem.len,
            mem.device,
            shape,
            Guard::None,
        ))
    }
}

impl<T: Elem> DevViewMut<'_, T> {
    /// Columns `start..start + width` of every row, writable (see [`DevView::columns`]).
    ///
    /// # Errors
    /// The columns lie outside the view.
    pub fn columns(&mut self, start: usize, width: usize) -> Result<DevViewMut<'_, T>> {
        let shape = MatShape::strided(self.shape.rows, width, self.shape.ld);
        let mem = sub(&self.mem, self.shape, 0, start, shape)?;
        Ok(DevViewMut::with_guard(
            mem.ptr,
            mem.len,
            mem.device,
            shape,
            Guard::None,
        ))
    }

    /// Rows `start..start + count`, writable (see [`DevView::rows`]).
    ///
    /// # Errors
    /// The rows lie outside the view.
    pub fn rows(&mut self, start: usize, count: usize) -> Result<DevViewMut<'_, T>> {
        let shape = MatShape::strided(count, self.shape.cols, self.shape.ld);
        let mem = sub(&self.mem, self.shape, start, 0, shape)?;
        Ok(DevViewMut::with_guard(
            mem.ptr,
            mem.len,
            mem.device,
            shape,
            Guard::None,
        ))
    }
}

impl<T: Elem> std::fmt::Debug for DevView<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DevView<{}>({:#x}, {}, {})",
            T::DTYPE,
            self.mem.ptr.0,
            self.shape,
            self.mem.device
        )
    }
}

impl<T: Elem> std::fmt::Debug for DevViewMut<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DevViewMut<{}>({:#x}, {}, {})",
            T::DTYPE,
            self.mem.ptr.0,
            self.shape,
            self.mem.device
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    fn mem(ptr: u64, len: usize) -> MemoryInfo {
        MemoryInfo {
            ptr: DevPtr(ptr),
            len,
            dtype: DType::F32,
            device: DeviceId::Emu { ordinal: 0 },
        }
    }

    #[test]
    fn span_and_overlap() {
        assert_eq!(MatShape::strided(3, 4, 10).span(), 24);
        assert_eq!(MatShape::new(0, 4).span(), 0);
        let dev = DeviceId::Emu { ordinal: 0 };
        let a = check_memory("a", &mem(256, 100), MatShape::new(2, 8), dev, 2, 8).unwrap();
        let b = check_memory("b", &mem(256 + 64, 100), MatShape::new(2, 8), dev, 2, 8).unwrap();
        let c = check_memory("c", &mem(256 + 60, 100), MatShape::new(2, 8), dev, 2, 8).unwrap();
        assert!(
            !a.overlaps(&b),
            "[256, 320) and [320, 384) touch but do not overlap"
        );
        assert!(a.overlaps(&c));
        let e = check_disjoint("y", &a, "x", &c).unwrap_err().to_string();
        assert!(e.starts_with("y overlaps x"), "{e}");
    }

    #[test]
    fn sub_views_stay_inside() {
        let m = mem(256, 40);
        let s = MatShape::new(4, 10);
        let c = sub(&m, s, 0, 6, MatShape::strided(4, 4, 10)).unwrap();
        assert_eq!((c.ptr.0, c.len), (256 + 24, 34));
        assert!(sub(&m, s, 0, 7, MatShape::strided(4, 4, 10)).is_err());
        assert!(sub(&m, s, 3, 0, MatShape::strided(2, 10, 10)).is_err());
    }
}
