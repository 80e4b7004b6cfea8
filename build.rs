//! Build script: stamps the git revision into `keyturn --version`, and
//! links the code a running daemon executes first (see [`hot_code_first`]).
//!
//! Sets `KEYTURN_VERSION` for the crate: `0.1.0 (git 1a2b3c4)`, the
//! revision being `git rev-parse --short HEAD` with `-dirty` when tracked
//! files have uncommitted changes. Building outside a git checkout (a crate
//! tarball, a source package) or without `git` gives the bare `0.1.0`; a
//! packager building from an export may set `KEYTURN_GIT_REV` themselves.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8(out.stdout).ok()?.trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=KEYTURN_GIT_REV");
    let version = env!("CARGO_PKG_VERSION");
    let rev = std::env::var("KEYTURN_GIT_REV")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(git_rev);
    match rev {
        Some(rev) => println!("cargo:rustc-env=KEYTURN_VERSION={version} (git {rev})"),
        None => println!("cargo:rustc-env=KEYTURN_VERSION={version}"),
    }
    hot_code_first();
}

/// Release builds of the `keyturn` binary link the functions listed in
/// `scripts/hot-symbols.txt` (what a running daemon executes; made by
/// `scripts/hot_symbols.py`) first, with LLD's `--symbol-ordering-file`.
/// The kernel maps code 64 KiB at a time around each touched page: packed
/// together, the ~3 MB a daemon runs are mapped instead of most of the
/// ~25 MB of `.text`, which was most of its RSS (BENCHMARKS.md, issue 11).
/// Names the file lists that the build lacks are skipped: a stale file only
/// loses some of the gain.
///
/// Only where the linker is known to be LLD: x86_64 Linux (GNU) with rustc
/// 1.90 or later and no linker of the builder's choosing. Elsewhere, and
/// with `KEYTURN_NO_SYMBOL_ORDER` set, the default order.
fn hot_code_first() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/hot-symbols.txt");
    println!("cargo:rerun-if-changed={}", file.display());
    println!("cargo:rerun-if-env-changed=KEYTURN_NO_SYMBOL_ORDER");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let lld_by_default = var("TARGET") == "x86_64-unknown-linux-gnu"
        && rustc_minor().is_some_and(|m| m >= 90)
        && std::env::var_os("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_none()
        && !var("CARGO_ENCODED_RUSTFLAGS").contains("link");
    let path = file.to_string_lossy();
    if var("PROFILE") != "release"
        || !lld_by_default
        || std::env::var_os("KEYTURN_NO_SYMBOL_ORDER").is_some()
        || !file.exists()
        || path.contains(',')
    {
        return;
    }
    println!("cargo:rustc-link-arg-bin=keyturn=-Wl,--symbol-ordering-file={path}");
    println!("cargo:rustc-link-arg-bin=keyturn=-Wl,--no-warn-symbol-ordering");
}

/// The minor version of the rustc building this (`1.95.0` → 95).
fn rustc_minor() -> Option<u32> {
    let rustc = std::env::var("RUSTC").ok()?;
    let out = Command::new(rustc).arg("--version").output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let version = text.split_whitespace().nth(1)?;
    let mut parts = version.split('.');
    (parts.next()? == "1").then_some(())?;
    parts.next()?.parse().ok()
}

/// The short revision of HEAD, `-dirty` when tracked files changed; `None`
/// outside a git checkout.
fn git_rev() -> Option<String> {
    // Only this package's own checkout: a source tarball unpacked inside
    // some other git repository must not take that repository's revision.
    let top = git(&["rev-parse", "--show-toplevel"])?;
    let here = std::env::current_dir().ok()?;
    if Path::new(&top).canonicalize().ok()? != here.canonicalize().ok()? {
        return None;
    }
    let rev = git(&["rev-parse", "--short", "HEAD"])?;
    // Rebuild when HEAD moves: HEAD itself (a checkout), the ref it points
    // to (a commit), and the index (staging or committing changes the dirty
    // flag). In a worktree these live under the worktree's git dir and the
    // common dir; `git rev-parse --git-path` names the right files.
    // A path that does not exist would make cargo rerun this script on
    // every build, so only existing ones are named (a packed ref has no
    // file of its own; packed-refs then changes instead).
    let mut watched = vec![
        "HEAD".to_owned(),
        "index".to_owned(),
        "packed-refs".to_owned(),
    ];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watched {
        if let Some(p) = git(&["rev-parse", "--git-path", &name]).map(|p| absolute(&p))
            && p.exists()
        {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
    // Only tracked files count: target/ and other ignored or untracked
    // files do not make a build "dirty". `--no-optional-locks` keeps
    // `status` from refreshing (rewriting) the index it is watched by, which
    // would make every build rerun this script. An edit not yet staged
    // shows up at the next change of HEAD or the index (as with any
    // build-time stamp, a build does not rescan the tree).
    let dirty = git(&[
        "--no-optional-locks",
        "status",
        "--porcelain",
        "--untracked-files=no",
    ])
    .is_some_and(|s| !s.is_empty());
    let suffix = if dirty { "-dirty" } else { "" };
    Some(format!("{rev}{suffix}"))
}

/// `git rev-parse --git-path` answers relative to the current directory
/// (the package root, where cargo runs build scripts).
fn absolute(p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_owned()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_owned())
    }
}
