//! The CPU reference path: the float64 reference against finite differences, and the f32
//! path against the float64 reference. One test binary for the subject.

mod reference_fd;
mod vs_reference;
