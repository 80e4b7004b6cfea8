//! `keyturn completions SHELL` and `keyturn --version`, for real: the bash
//! script is sourced in `bash` and asked for candidates the way readline
//! asks (COMP_WORDS/COMP_CWORD, then the registered function), and it runs
//! the built `keyturn` to answer.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_keyturn");

/// A config with two agents (one credential each), as an operator writes it.
fn config_text() -> String {
    let agent = |name: &str, owner: &str, tier: &str, cred: &str| {
        format!(
            "[agents.{name}]\nowner = \"{owner}@example.com\"\ntenant = \"acme\"\ntier = \"{tier}\"\n\n\
             [agents.{name}.credentials.{cred}]\nvault = \"local\"\npath = \"acme/{name}/{cred}\"\n\
             generate = {{ kind = \"password\", length = 32 }}\nschedule = \"@every 1h\"\n\n"
        )
    };
    format!(
        "[daemon]\nstate_dir = \"/nonexistent/state\"\n\n[vaults.local]\ntype = \"local\"\n\n{}{}",
        agent("invoice-bot", "alice", "high", "db"),
        agent("report-bot", "bob", "low", "api")
    )
}

/// The candidates that are not options (an empty word also lists the
/// command's options).
fn values(candidates: Vec<String>) -> Vec<String> {
    candidates
        .into_iter()
        .filter(|c| !c.starts_with('-'))
        .collect()
}

/// Candidates bash computes for the command line `words` (the last word is
/// the one being completed), with `keyturn` on PATH being the built binary
/// and `env` set.
fn complete(dir: &Path, words: &[&str], env: &[(&str, &str)]) -> Vec<String> {
    let bin_dir = dir.join("bin");
    if !bin_dir.exists() {
        std::fs::create_dir(&bin_dir).unwrap();
        std::os::unix::fs::symlink(BIN, bin_dir.join("keyturn")).unwrap();
    }
    let script = Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(script.status.success());
    let script_path = dir.join("keyturn.bash");
    std::fs::write(&script_path, &script.stdout).unwrap();
    let quoted: Vec<String> = words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
        .collect();
    let cword = words.len() - 1;
    // What readline does on TAB: fill COMP_* and call the function that
    // `complete -F` registered for `keyturn`, with (command, word, previous word).
    let driver = format!(
        r#"set -u
source '{script}'
spec=$(complete -p keyturn) || {{ echo "no completion registered for keyturn" >&2; exit 3; }}
func=$(sed -E 's/.* -F ([^ ]+) .*/\1/' <<<"$spec")
COMP_WORDS=({words})
COMP_CWORD={cword}
COMP_LINE="${{COMP_WORDS[*]}}"
COMP_POINT=${{#COMP_LINE}}
COMP_TYPE=9
"$func" keyturn "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\n' "${{COMPREPLY[@]}}"
"#,
        script = script_path.display(),
        words = quoted.join(" "),
    );
    let mut cmd = Command::new("bash");
    cmd.arg("--norc")
        .arg("--noprofile")
        .arg("-c")
        .arg(driver)
        .env("PATH", format!("{}:/usr/bin:/bin", bin_dir.display()))
        .env_remove("KEYTURN_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("bash runs");
    assert!(
        out.status.success(),
        "bash: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut got: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect();
    got.sort();
    got
}

fn with_config() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keyturn.toml");
    std::fs::write(&config, config_text()).unwrap();
    let config = config.to_str().unwrap().to_owned();
    (dir, config)
}

#[test]
fn bash_completes_subcommands() {
    let (dir, _) = with_config();
    let got = complete(dir.path(), &["keyturn", ""], &[]);
    for sub in [
        "check",
        "daemon",
        "status",
        "rotate",
        "decommission",
        "surface",
        "watch",
        "ack",
        "task",
        "token",
        "audit",
        "completions",
    ] {
        assert!(got.contains(&sub.to_owned()), "no {sub} in {got:?}");
    }
    let got = complete(dir.path(), &["keyturn", "d"], &[]);
    assert_eq!(got, ["daemon", "decommission"]);
    let got = complete(dir.path(), &["keyturn", "token", ""], &[]);
    assert!(got.contains(&"exchange".to_owned()), "{got:?}");
}

#[test]
fn bash_completes_agent_ids_of_the_config_the_command_uses() {
    let (dir, config) = with_config();
    // `--config` on the command line.
    let got = complete(
        dir.path(),
        &["keyturn", "--config", &config, "decommission", ""],
        &[],
    );
    assert_eq!(values(got), ["invoice-bot", "report-bot"]);
    // KEYTURN_CONFIG, and a prefix.
    let got = complete(
        dir.path(),
        &["keyturn", "rotate", "inv"],
        &[("KEYTURN_CONFIG", &config)],
    );
    assert_eq!(got, ["invoice-bot", "invoice-bot/db"]);
    let got = complete(dir.path(), &["keyturn", "-c", &config, "rotate", ""], &[]);
    assert_eq!(
        values(got),
        [
            "all",
            "invoice-bot",
            "invoice-bot/db",
            "report-bot",
            "report-bot/api"
        ]
    );
    // `ack` takes AGENT/CREDENTIAL.
    let got = complete(
        dir.path(),
        &["keyturn", "ack", "--config", &config, "rep"],
        &[],
    );
    assert_eq!(got, ["report-bot/api"]);
    // `token exchange --as` takes an agent.
    let got = complete(
        dir.path(),
        &["keyturn", "-c", &config, "token", "exchange", "--as", "inv"],
        &[],
    );
    assert_eq!(got, ["invoice-bot"]);

    // A config directory: the agents of `agents.d/*.toml` too.
    let agents_d = dir.path().join("agents.d");
    std::fs::create_dir(&agents_d).unwrap();
    std::fs::write(
        agents_d.join("crawler.toml"),
        "[agents.crawler]\n[agents.crawler.credentials.session]\n",
    )
    .unwrap();
    let conf_dir = dir.path().to_str().unwrap();
    let got = complete(dir.path(), &["keyturn", "-c", conf_dir, "rotate", ""], &[]);
    assert_eq!(
        values(got),
        [
            "all",
            "crawler",
            "crawler/session",
            "invoice-bot",
            "invoice-bot/db",
            "report-bot",
            "report-bot/api"
        ]
    );
}

#[test]
fn an_unreadable_config_completes_nothing_and_says_nothing() {
    let (dir, _) = with_config();
    let got = complete(
        dir.path(),
        &[
            "keyturn",
            "-c",
            "/nonexistent/keyturn.toml",
            "decommission",
            "",
        ],
        &[],
    );
    let got = values(got);
    assert!(got.is_empty(), "{got:?}");
}

#[test]
fn zsh_and_fish_scripts_ask_keyturn() {
    for (shell, needle) in [("zsh", "#compdef keyturn"), ("fish", "complete")] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains(needle), "{shell}: {text}");
        assert!(
            text.contains(&format!("COMPLETE=\"{shell}\""))
                || text.contains(&format!("COMPLETE={shell}")),
            "{shell}: {text}"
        );
    }
    let out = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

/// `keyturn --version` names the git revision it was built from, when it
/// was built in a git checkout (CI's is one).
#[test]
fn version_names_the_git_revision() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text.trim();
    let version = env!("CARGO_PKG_VERSION");
    assert!(line.starts_with(&format!("keyturn {version}")), "{line}");
    let head = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    match head {
        Ok(h) if h.status.success() => {
            let rev = String::from_utf8(h.stdout).unwrap().trim().to_owned();
            let want = format!("keyturn {version} (git {rev}");
            assert!(
                line == format!("{want})") || line == format!("{want}-dirty)"),
                "{line}, HEAD is {rev}"
            );
        }
        // A build outside a checkout prints the bare version.
        _ => assert_eq!(line, format!("keyturn {version}")),
    }
}
