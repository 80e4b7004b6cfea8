//! `keyturn manpages DIR`: the man pages, rendered by clap_mangen from the
//! same clap definitions the binary parses with, so a page can never
//! describe a flag the binary does not have. packaging/build.sh runs it and
//! the packages install the pages in /usr/share/man/man1.

use std::path::Path;

use clap::CommandFactory;

use super::{Cli, EXIT_FAILED};

/// Writes `keyturn.1` and one page per visible command, nested ones named
/// by their path (`keyturn-audit-verify.1`), into `dir`.
pub(super) fn write(dir: &Path) -> u8 {
    let written =
        std::fs::create_dir_all(dir).and_then(|()| clap_mangen::generate_to(Cli::command(), dir));
    match written {
        Ok(()) => {
            println!("man pages written to {}", dir.display());
            0
        }
        Err(e) => {
            eprintln!(
                "keyturn: cannot write the man pages to {}: {e}",
                dir.display()
            );
            EXIT_FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::process::Command;

    use super::*;

    /// The page names every command should have, from the clap tree
    /// walked here independently of clap_mangen: hidden commands (this
    /// one) and clap's generated `help` get none.
    fn expected(cmd: &clap::Command, prefix: &str, out: &mut BTreeSet<String>) {
        let name = if prefix.is_empty() {
            cmd.get_name().to_owned()
        } else {
            format!("{prefix}-{}", cmd.get_name())
        };
        for sub in cmd.get_subcommands() {
            if !sub.is_hide_set() && sub.get_name() != "help" {
                expected(sub, &name, out);
            }
        }
        out.insert(format!("{name}.1"));
    }

    /// The about line of every page's command, to find in its rendering.
    fn about_of(cmd: &clap::Command, page: &str) -> Option<String> {
        let mut parts = page.trim_end_matches(".1").split('-').skip(1);
        let mut cur = cmd;
        for part in parts.by_ref() {
            cur = cur.find_subcommand(part)?;
        }
        cur.get_about().map(|a| a.to_string())
    }

    /// Renders `page` with groff's man macros, every warning on, as plain
    /// text (`-P-cbou`: no overstriking or escapes for bold and underline);
    /// returns (stdout, stderr).
    fn groff(page: &Path) -> (String, String) {
        let out = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-P-cbou"])
            .arg(page)
            .env("LC_ALL", "C.UTF-8")
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run groff ({e}); `bash packaging/tools.sh` installs groff-base")
            });
        assert!(
            out.status.success(),
            "groff failed on {}: {}",
            page.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[test]
    fn every_command_has_a_page_that_groff_renders_without_warnings() {
        let dir = tempfile::tempdir().unwrap();
        // A directory that does not exist yet: the command creates it.
        let out = dir.path().join("man1");
        assert_eq!(write(&out), 0);

        let cmd = Cli::command();
        let mut want = BTreeSet::new();
        expected(&cmd, "", &mut want);
        // The tree this test walks is the real one, not an empty stand-in.
        for page in ["keyturn.1", "keyturn-check.1", "keyturn-audit-verify.1"] {
            assert!(want.contains(page), "{page} not expected: {want:?}");
        }
        let got: BTreeSet<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(got, want, "pages written vs commands");
        assert!(
            !got.contains("keyturn-manpages.1"),
            "the hidden command has a page"
        );

        for page in &got {
            let (text, warnings) = groff(&out.join(page));
            assert!(warnings.is_empty(), "groff warned on {page}: {warnings}");
            // The NAME section names the command, and its description is there.
            let name = page.trim_end_matches(".1");
            assert!(text.contains(name), "{page} does not name {name}:\n{text}");
            if let Some(about) = about_of(&cmd, page) {
                let first = about
                    .split_whitespace()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" ");
                let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
                assert!(flat.contains(&first), "{page} lacks {first:?}:\n{text}");
            }
        }
        // The global options are documented on the top page.
        let (top, _) = groff(&out.join("keyturn.1"));
        assert!(top.contains("--config"), "{top}");
    }

    #[test]
    fn an_unwritable_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(write(&file.join("man1")), EXIT_FAILED);
    }
}
