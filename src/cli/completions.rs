//! Shell completion: `keyturn completions bash|zsh|fish` prints a script
//! that asks `keyturn` itself for the candidates at each TAB
//! (clap_complete's dynamic completion: the script runs
//! `COMPLETE=bash keyturn -- WORDS...`). Asking the binary keeps the
//! script in step with the commands of the installed version, and lets it
//! complete what a static script cannot: the agent ids and credentials of
//! the config the command would use (`--config`/`-c` on the command line,
//! else `KEYTURN_CONFIG`, else the default path).

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::path::PathBuf;

use clap::CommandFactory;
use clap_complete::engine::CompletionCandidate;
use clap_complete::env::{CompleteEnv, EnvCompleter};

use super::Cli;
use crate::config::DEFAULT_CONFIG_PATH;

/// The environment variable the registration script sets to ask for
/// candidates (clap_complete's default).
const VAR: &str = "COMPLETE";

/// The shells `keyturn completions` writes a script for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Answers a completion request and exits when `COMPLETE` is set (the
/// script's call); returns at once otherwise.
pub fn answer_if_asked() {
    CompleteEnv::with_factory(Cli::command).var(VAR).complete();
}

/// Writes the registration script for `shell`: it completes the `keyturn`
/// found on `PATH` by running it.
pub fn write_script(shell: Shell, out: &mut dyn Write) -> std::io::Result<()> {
    let completer: &dyn EnvCompleter = match shell {
        Shell::Bash => &clap_complete::env::Bash,
        Shell::Zsh => &clap_complete::env::Zsh,
        Shell::Fish => &clap_complete::env::Fish,
    };
    completer.write_registration(VAR, "keyturn", "keyturn", "keyturn", out)
}

/// Candidates for an agent id: the config's agents.
pub fn agents(current: &OsStr) -> Vec<CompletionCandidate> {
    let prefix = current.to_string_lossy();
    names(false)
        .into_iter()
        .filter(|n| n.starts_with(prefix.as_ref()))
        .map(CompletionCandidate::new)
        .collect()
}

/// Candidates for `AGENT/CREDENTIAL`.
pub fn credentials(current: &OsStr) -> Vec<CompletionCandidate> {
    let prefix = current.to_string_lossy();
    names(true)
        .into_iter()
        .filter(|n| n.contains('/') && n.starts_with(prefix.as_ref()))
        .map(CompletionCandidate::new)
        .collect()
}

/// Candidates for a rotation selector: `all`, `AGENT` or `AGENT/CREDENTIAL`.
pub fn selectors(current: &OsStr) -> Vec<CompletionCandidate> {
    let prefix = current.to_string_lossy();
    std::iter::once("all".to_owned())
        .chain(names(true))
        .filter(|n| n.starts_with(prefix.as_ref()))
        .map(CompletionCandidate::new)
        .collect()
}

/// The agent ids of the config, and with `credentials` also every
/// `AGENT/CREDENTIAL`. Read leniently (just the TOML tables), so that a
/// config with an error elsewhere still completes; anything unreadable
/// gives no candidates rather than an error in the middle of a command line.
fn names(credentials: bool) -> Vec<String> {
    let path = config_path(std::env::args_os());
    // A config directory: its main file and every `agents.d/*.toml`.
    let files = match crate::config::load::read_sources(&path) {
        Ok((_, files)) => files.into_iter().map(|f| f.text).collect(),
        Err(_) => std::fs::read_to_string(&path)
            .into_iter()
            .collect::<Vec<_>>(),
    };
    let tables: Vec<toml::Table> = files.iter().filter_map(|t| t.parse().ok()).collect();
    let agents = tables
        .iter()
        .filter_map(|t| t.get("agents").and_then(|a| a.as_table()))
        .flatten();
    let mut out = Vec::new();
    for (agent, body) in agents {
        out.push(agent.clone());
        if !credentials {
            continue;
        }
        let creds = body
            .get("credentials")
            .and_then(|c| c.as_table())
            .into_iter()
            .flat_map(|c| c.keys());
        out.extend(creds.map(|c| format!("{agent}/{c}")));
    }
    out
}

/// The config a command line would use: its `--config`/`-c` (in any of
/// clap's spellings), else `KEYTURN_CONFIG`, else the default. In a
/// completion request the command line is the arguments after `--`.
fn config_path(args: impl IntoIterator<Item = OsString>) -> PathBuf {
    let args: Vec<OsString> = args.into_iter().collect();
    let words = match args.iter().position(|a| a == "--") {
        Some(i) => &args[i + 1..],
        None => &args[..],
    };
    let mut found = None;
    let mut it = words.iter();
    while let Some(word) = it.next() {
        let Some(w) = word.to_str() else { continue };
        if w == "--" {
            break;
        }
        if w == "--config" || w == "-c" {
            found = it.next().cloned();
        } else if let Some(v) = w.strip_prefix("--config=") {
            found = Some(v.into());
        } else if let Some(v) = w.strip_prefix("-c").filter(|v| !v.is_empty()) {
            found = Some(v.strip_prefix('=').unwrap_or(v).into());
        }
    }
    found
        .or_else(|| std::env::var_os("KEYTURN_CONFIG").filter(|v| !v.is_empty()))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(args: &[&str]) -> PathBuf {
        config_path(args.iter().map(OsString::from))
    }

    #[test]
    fn the_config_is_the_one_the_command_line_names() {
        let line = |rest: &[&str]| {
            let mut a = vec!["keyturn", "--", "keyturn"];
            a.extend_from_slice(rest);
            path(&a)
        };
        assert_eq!(
            line(&["--config", "/a.toml", "rotate", ""]),
            PathBuf::from("/a.toml")
        );
        assert_eq!(
            line(&["rotate", "--config=/b.toml", ""]),
            PathBuf::from("/b.toml")
        );
        assert_eq!(
            line(&["-c", "/c.toml", "rotate", ""]),
            PathBuf::from("/c.toml")
        );
        assert_eq!(line(&["-c/d.toml", "rotate", ""]), PathBuf::from("/d.toml"));
        // The last one wins, as clap parses it.
        assert_eq!(
            line(&["-c", "/e.toml", "rotate", "--config", "/f.toml", ""]),
            PathBuf::from("/f.toml")
        );
        // Words after a `--` of the command line are not options (watch's COMMAND).
        assert_ne!(
            line(&["watch", "--file", "x", "--", "-c", "/g.toml"]),
            PathBuf::from("/g.toml")
        );
    }
}
