//! Build script: stamps the git revision into `keyturn --version`.
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
