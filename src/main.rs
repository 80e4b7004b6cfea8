//! `keyturn`: thin entry point; everything lives in the library (`cli::main`).

fn main() -> std::process::ExitCode {
    keyturn::cli::main()
}
