// The migrations are embedded when infra is built: a new or changed one rebuilds it.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
