//! Prints the before/after launch geometry of the tuned kernels at the reference shapes
//! (`dorafuse::kernels::spec::tuning_table`), the table kernels/README.md holds:
//! `cargo run --example tuning_geometry`.

fn main() {
    print!("{}", dorafuse::kernels::spec::tuning_table());
}
