//! The file sink's config: `deliver = [{ type = "file", ... }]`, its check and its constructor.

use super::*;

/// Default file mode: owner read only.
pub const DEFAULT_MODE: u32 = 0o400;
/// Files hold secrets: owner read/write, group read at most.
pub const MAX_MODE: u32 = 0o640;

/// One `deliver = [{ type = "file", ... }]` entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Absolute, or relative to the one delivery root; after `check`,
    /// absolute and inside a delivery root. For a keypair this is a
    /// directory holding `..data` and the bundle's links.
    pub path: PathBuf,
    pub format: Option<FileFormat>,
    /// Octal, as a string (`"0440"`); default 0400, never wider than 0640.
    pub mode: Option<String>,
    /// Variable name for `format = "env"`; `check` fills in the default
    /// (the credential's name upper-cased, `-` → `_`).
    pub env_name: Option<String>,
    /// `false`: write the new value into the existing file (same inode)
    /// instead of renaming a new file over it; see the module doc. Default true.
    pub atomic: Option<bool>,
    /// Whether the consumer must acknowledge a delivery before the previous
    /// version is retired early (see `rotation/acks.rs`): `open` (opening
    /// the file after delivery acks it), `explicit` (`keyturn ack`). Default
    /// none: the file in place counts as acknowledged.
    pub ack: Option<FileAck>,
}

/// How a file's consumer acknowledges a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileAck {
    /// Opening the file after it was put in place (inotify `IN_OPEN`).
    Open,
    /// `keyturn ack AGENT/CREDENTIAL VERSION`.
    Explicit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    Raw,
    Json,
    Env,
}

impl FileFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            FileFormat::Raw => "raw",
            FileFormat::Json => "json",
            FileFormat::Env => "env",
        }
    }
}

impl FileConfig {
    pub fn new(path: impl Into<PathBuf>, format: FileFormat) -> Self {
        Self {
            path: path.into(),
            format: Some(format),
            mode: None,
            env_name: None,
            atomic: None,
            ack: None,
        }
    }

    /// Whether deliveries rename a new file into place (the default) rather
    /// than rewrite the existing one.
    pub fn atomic(&self) -> bool {
        self.atomic.unwrap_or(true)
    }

    pub fn format(&self) -> FileFormat {
        self.format.unwrap_or(FileFormat::Raw)
    }

    /// The mode; `None` when it is not octal.
    pub fn mode(&self) -> Option<u32> {
        let Some(m) = self.mode.as_deref() else {
            return Some(DEFAULT_MODE);
        };
        (!m.is_empty() && m.len() <= 4 && m.bytes().all(|b| (b'0'..=b'7').contains(&b)))
            .then(|| u32::from_str_radix(m, 8).ok())
            .flatten()
    }

    /// A valid path: absolute as written, or under the one delivery root.
    /// `roots` hold normalised paths, so normalising onto the root is the
    /// same as `normalize(&root.join(path))` without the second buffer.
    pub(super) fn resolve(roots: &[PathBuf], written: &Path) -> PathBuf {
        match roots {
            [root] if !written.is_absolute() => {
                let mut out =
                    PathBuf::with_capacity(root.as_os_str().len() + 1 + written.as_os_str().len());
                out.push(root);
                normalize_onto(out, written)
            }
            _ => normalize(written),
        }
    }

    /// The path: never `..`; absolute, or relative to the single delivery
    /// root; inside a delivery root; used by this sink only.
    fn check_path(&mut self, v: &mut Validator<'_>, p: Loc<'_>, scope: &mut SinkScope<'_, '_>) {
        let Some(roots) = scope.roots else { return };
        if roots.is_empty() {
            if scope.first_to_miss_roots() {
                v.err(
                    p,
                    "file sinks need `daemon.delivery_roots`: set it to the directories keyturn may write secrets under",
                );
            }
            return;
        }
        let written = self.path.as_path();
        let text = written.display();
        if written.as_os_str().is_empty() {
            v.err(p, "delivery path must not be empty");
            return;
        }
        // NUL cannot be in a file name (every delivery would fail); a
        // newline or another control character makes a name that tools,
        // logs and the agent's own config misread.
        if let Some(c) = written
            .to_str()
            .and_then(|t| t.chars().find(|c| c.is_control()))
        {
            v.err(
                p,
                format!(
                    "delivery path `{}` contains the control character {c:?}; file names here are printable",
                    text.to_string().escape_debug()
                ),
            );
            return;
        }
        if v.unexpanded(p, &written.to_string_lossy()) {
            return;
        }
        // Black-box finding: `<root>/app/.` and `<root>/app/dir/` were
        // taken and a file written at `<root>/app` and `<root>/app/dir`;
        // a name over 255 bytes failed every delivery, for ever.
        let raw = written.as_os_str().as_encoded_bytes();
        if raw.ends_with(b"/") || raw.ends_with(b"/.") || raw == b"." {
            v.err(
                p,
                format!(
                    "delivery path `{text}` ends with `/` or `/.`: it names the file keyturn writes, so end it with the file's name"
                ),
            );
            return;
        }
        if let Some(long) = written.components().find(|c| c.as_os_str().len() > 255) {
            v.err(
                p,
                format!(
                    "delivery path `{text}`: the name `{}...` is {} bytes long; a file name is at most 255 bytes",
                    long.as_os_str().to_string_lossy().chars().take(16).collect::<String>(),
                    long.as_os_str().len()
                ),
            );
            return;
        }
        // Black-box finding: a name of keyturn's temp files' shape
        // (`.NAME.tmp.<16 hex digits>`) passed `check`, and the sweep of
        // stale temp files removed the delivered file at every start.
        if let Some(temp) = written.components().find(|c| {
            let b = c.as_os_str().as_encoded_bytes();
            b.starts_with(b".")
                && b.len() > 21
                && b[b.len() - 21..].starts_with(b".tmp.")
                && b[b.len() - 16..].iter().all(u8::is_ascii_hexdigit)
        }) {
            v.err(
                p,
                format!(
                    "delivery path `{text}`: `{}` has the shape of keyturn's temp files (`.NAME.tmp.` and 16 hex digits), which keyturn removes as left over; name it otherwise",
                    temp.as_os_str().to_string_lossy()
                ),
            );
            return;
        }
        // `..` is refused outright rather than normalised away: with
        // symlinks in play, `a/../b` need not be where it looks.
        if written.components().any(|c| c == Component::ParentDir) {
            v.err(
                p,
                format!("delivery path `{text}` contains `..`; write the path without it"),
            );
            return;
        }
        if !written.is_absolute() && roots.len() != 1 {
            v.err(
                p,
                format!(
                    "delivery path `{text}` is relative, which is only allowed with exactly one delivery root; there are {} ({}), so write an absolute path",
                    roots.len(),
                    list(roots.iter().map(|r| r.display().to_string()))
                ),
            );
            return;
        }
        let resolved = Self::resolve(roots, written);
        // The most specific root, as the sink picks it.
        let Some(root) = roots
            .iter()
            .filter(|r| resolved.starts_with(r) && resolved != **r)
            .max_by_key(|r| r.components().count())
        else {
            v.err(
                p,
                format!(
                    "delivery path `{}` is outside every delivery root ({})",
                    resolved.display(),
                    list(roots.iter().map(|r| r.display().to_string()))
                ),
            );
            return;
        };
        // A directory right below a root named after an agent is that
        // agent's (the sink gives it the agent's owner); another agent's
        // file there would make it, or sit in it, with the wrong owner.
        if let Some(Component::Normal(first)) = resolved
            .strip_prefix(root)
            .ok()
            .and_then(|rest| rest.components().next())
            && let Some(first) = first.to_str()
            && scope.is_other_agent(first)
        {
            let agent = scope.agent;
            v.err(
                p,
                format!(
                    "delivery path `{}` of agent `{agent}` is in the directory of agent `{first}` ({}); put agent `{agent}`'s files under {}",
                    resolved.display(),
                    root.join(first).display(),
                    root.join(agent).display(),
                ),
            );
            return;
        }
        if scope.claim(v, p, "path", &resolved) {
            // The agent's directory, as the sink takes it: the one named
            // after the agent right below the root, else the one holding
            // the file or the bundle (none when that is the root).
            let named = root.join(scope.agent);
            let dir = if resolved.starts_with(&named) {
                Some(named.as_path())
            } else {
                resolved.parent().filter(|d| d != root)
            };
            if let Some(dir) = dir {
                scope.claim_agent_dir(dir);
            }
            self.path = resolved;
        }
    }
}

impl SinkPlugin for FileConfig {
    fn check(&mut self, v: &mut Validator<'_>, p: Loc<'_>, scope: &mut SinkScope<'_, '_>) {
        self.check_path(v, p.key("path"), scope);
        // A keypair is a directory of files that must change together; only
        // the `..data` swap gives a reader a consistent pair, and a directory
        // cannot be bind-mounted as a single file anyway.
        if !self.atomic() && scope.keypair {
            v.err(
                p.key("atomic"),
                format!(
                    "`atomic = false` cannot deliver credential `{}`: an ed25519 keypair is delivered as a directory whose files must change together, which only the atomic swap gives; remove `atomic = false` (bind-mount the directory, not a file in it)",
                    scope.credential
                ),
            );
        }
        if self.ack == Some(FileAck::Open) && scope.keypair {
            v.err(
                p.key("ack"),
                format!(
                    "`ack = \"open\"` cannot watch credential `{}`: an ed25519 keypair is delivered as a directory of links; use `ack = \"explicit\"` (`keyturn ack`)",
                    scope.credential
                ),
            );
        }
        if self.mode.is_some() {
            let at = p.key("mode");
            let text = self.mode.as_deref().unwrap_or_default();
            match self.mode() {
                None => {
                    let octal = !text.is_empty() && text.bytes().all(|b| (b'0'..=b'7').contains(&b));
                    let why = if octal {
                        format!("it has {} digits; a mode has at most four", text.len())
                    } else {
                        "write octal digits as a string".to_owned()
                    };
                    v.err(
                        at,
                        format!("invalid file mode `{text}`: {why}, e.g. \"0440\""),
                    )
                }
                Some(mode) if mode & !MAX_MODE != 0 => v.err(
                    at,
                    format!(
                        "file mode {mode:04o} is wider than 0640: secrets may be readable by owner and group only, never by others or executable"
                    ),
                ),
                Some(mode) if mode & 0o440 == 0 => v.err(
                    at,
                    format!(
                        "file mode {mode:04o} lets no one read the secret: the agent reads it as the file's owner (\"0400\") or group (\"0440\")"
                    ),
                ),
                Some(_) => {}
            }
        }
        // A bundle is always `private.pem`, `public.pem` and `meta.json`:
        // a format would be ignored without a word.
        if scope.keypair
            && (self.format.is_some_and(|f| f != FileFormat::Raw) || self.env_name.is_some())
        {
            let key = if self.env_name.is_some() && self.format.is_none() {
                "env_name"
            } else {
                "format"
            };
            v.err(
                p.key(key),
                format!(
                    "`{key}` does not apply to credential `{}`: an ed25519 keypair is delivered as a directory of `private.pem`, `public.pem` and `meta.json` (JSON), whatever the format; remove `{key}`",
                    scope.credential
                ),
            );
            return;
        }
        match &self.env_name {
            // Black-box finding: an `env_name` on a raw or json sink was
            // ignored without a word (the agent then looked for a variable
            // that no file holds).
            Some(_) if self.format() != FileFormat::Env => {
                v.err(
                    p.key("env_name"),
                    format!(
                        "`env_name` applies only to `format = \"env\"`, and this sink writes {}; set `format = \"env\"` or remove `env_name`",
                        self.format().as_str()
                    ),
                );
            }
            Some(n) if !is_env_name(n) => {
                v.err(
                    p.key("env_name"),
                    format!("invalid env_name `{n}`: it must match [A-Z_][A-Z0-9_]*"),
                );
            }
            Some(_) => {}
            // Only an env file uses the name, so a credential name that
            // makes a bad variable name matters only there.
            None if self.format() == FileFormat::Env => {
                let cred = scope.credential;
                let derived = cred.to_ascii_uppercase().replace('-', "_");
                if !is_env_name(&derived) {
                    v.err(
                        p.key("format"),
                        format!(
                            "the variable name derived from credential `{cred}` is `{derived}`, which does not match [A-Z_][A-Z0-9_]*; set env_name"
                        ),
                    );
                }
                self.env_name = Some(derived);
            }
            None => {}
        }
    }

    fn build(self: Box<Self>, ctx: &SinkContext<'_>) -> Result<Arc<dyn Sink>, PluginError> {
        Ok(Arc::new(FileSink::new(*self, ctx)?))
    }
}
