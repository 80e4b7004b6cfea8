//! `keyturn`: thin entry point; everything lives in the library (`cli::main`).

/// jemalloc for every Rust allocation of the binary (see `Cargo.toml` and
/// `memory.rs`): a long-running daemon with 100k small long-lived objects
/// fragments glibc's heap.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    keyturn::cli::main()
}
