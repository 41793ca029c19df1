//! placeholder: the comparison bench is being written.
fn main() {}
