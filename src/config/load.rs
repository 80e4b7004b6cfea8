//! Reading a config file: parse, deserialize section by section, validate,
//! and locate every error (file:line:col and TOML path).
//!
//! The steps, and why they are separate:
//! 1. `toml_edit::Document` parses the text and keeps the byte span of
//!    every key and value. A syntax error (including a duplicate key or
//!    table) stops here: it is the one error reported, at its position.
//! 2. Each section (the daemon table, each tier, vault, agent and credential)
//!    is deserialized on its own into the [`raw`](super::raw) structs, so one
//!    bad section does not hide the errors in the others. `serde_path_to_error`
//!    says where inside the section a problem is.
//! 3. [`validate`](super::validate) checks meaning (ids, references,
//!    durations, paths, ...) purely and reports every issue by TOML path.
//! 4. Each issue's path is looked up in the document to get a line and
//!    column; the list is sorted by position.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::{DeserializeOwned, IntoDeserializer};
use toml_edit::{Document, Item, Key, Table, TableLike, Value};

use super::raw::{
    Parsed, RawAgent, RawAgentEntry, RawConfig, RawCredential, RawDaemon, RawTier, RawVault,
    TOP_LEVEL_KEYS,
};
use super::validate::{self, Anchor, Context, Issue, Seg, TomlPath, normalize};
use super::{Config, fast_toml};

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when unknown (e.g. the file cannot be read).
    pub line: usize,
    pub column: usize,
    /// Dotted TOML path, e.g. `agents.invoice-bot.credentials.db.schedule`;
    /// empty for a syntax error or a file that cannot be read.
    pub toml_path: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if !self.toml_path.is_empty() {
            write!(f, "{}: ", self.toml_path)?;
        }
        f.write_str(&self.message)
    }
}

/// All problems found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for e in &self.0 {
            writeln!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and validates a config file.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    match std::fs::read_to_string(path) {
        Ok(text) => load_str(path, &text),
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            toml_path: String::new(),
            message: format!("cannot read config file: {e}"),
        }])),
    }
}

/// Validates config text as if read from `file` (relative paths in the text
/// resolve against `file`'s directory, made absolute with the current
/// directory when `file` is relative).
pub fn load_str(file: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let source = if file.is_absolute() {
        normalize(file)
    } else {
        // The only environment this reads: relative paths in the config
        // must not change meaning if the daemon later changes directory.
        let cwd = std::env::current_dir().unwrap_or_default();
        normalize(&cwd.join(file))
    };
    let ctx = Context { source };

    // Fast path, taken by every valid file (each start and reload): one
    // serde pass over the whole file, no spans kept (our subset parser, or
    // the `toml` crate for what it declines). It is many times quicker than
    // the span-keeping path below and leaves far less heap behind (at 100k
    // credentials: seconds and hundreds of MB).
    // Any problem at all, and the file is read again the slow way, which
    // finds every error and locates each one.
    if let Ok(raw) = fast_parse(text)
        && let Ok(config) = validate::validate(&raw, &ctx)
    {
        // Freeing millions of small strings takes a noticeable fraction of
        // the load (0.2 s at 100k credentials); nobody waits for it.
        let _ = std::thread::Builder::new()
            .name("config-free".into())
            .spawn(move || drop(raw));
        return Ok(config);
    }
    load_located(file, text, &ctx)
}

/// The slow path: spans kept, each section on its own, every error located.
fn load_located(file: &Path, text: &str, ctx: &Context) -> Result<Config, ConfigErrors> {
    let doc = match Document::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
            // toml_edit splits its message over lines; one line reads better
            // after `file:line:col:`.
            let message: Vec<&str> = e.message().lines().map(str::trim).collect();
            let mut message = message.join(": ");
            // "duplicate key" alone does not say which: name it and its table.
            if message == "duplicate key"
                && let Some(span) = e.span()
                && let Some(key) = text.get(span.clone())
            {
                let line_start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
                let line_end = text[span.start..]
                    .find('\n')
                    .map_or(text.len(), |i| span.start + i);
                message = format!(
                    "duplicate key `{key}` (in `{}`): a table or key may be defined only once",
                    text[line_start..line_end].trim()
                );
            }
            return Err(ConfigErrors(vec![ConfigError {
                file: file.to_path_buf(),
                line,
                column,
                toml_path: String::new(),
                message: format!("TOML syntax error: {message}"),
            }]));
        }
    };

    let (raw, mut issues) = deserialize_sections(doc.as_table());
    let config = validate::validate(&raw, ctx);
    match config {
        Ok(config) if issues.is_empty() => return Ok(config),
        Ok(_) => {}
        Err(more) => issues.extend(more),
    }

    let mut errors: Vec<ConfigError> = issues
        .into_iter()
        .map(|issue| to_error(file, text, &doc, issue))
        .collect();
    errors.sort_by_key(|e| (e.line, e.column));
    errors.dedup();
    Err(ConfigErrors(errors))
}

/// A one-paragraph description of a loaded config, for `keyturn check`.
pub fn summary(cfg: &Config) -> String {
    let mut s = format!(
        "{}: ok: {} agents, {} credentials, {} vaults, {} tiers\n",
        cfg.source.display(),
        cfg.agents.len(),
        cfg.credential_count(),
        cfg.vaults.len(),
        cfg.tiers.len()
    );
    s.push_str(&format!("state_dir: {}\n", cfg.daemon.state_dir.display()));
    s.push_str(&format!("socket: {}\n", cfg.daemon.socket.display()));
    if let Some(listen) = cfg.daemon.listen {
        s.push_str(&format!("listen: {listen}\n"));
    }
    s
}

/// The whole file in one serde pass (the shape [`fast_parse`] reads).
#[derive(Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    daemon: Option<RawDaemon>,
    tiers: Option<BTreeMap<String, RawTier>>,
    #[serde(default)]
    vaults: BTreeMap<String, RawVault>,
    #[serde(default)]
    agents: BTreeMap<String, FileAgent>,
}

#[derive(Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAgent {
    owner: String,
    tenant: String,
    tier: String,
    uid: Option<u32>,
    gid: Option<u32>,
    #[serde(default)]
    credentials: BTreeMap<String, RawCredential>,
}

/// The whole file in one serde pass (the fast path of [`load_str`]). Agents
/// and credentials come out in key order rather than file order; that only
/// matters for which of two clashing entries an error names, and errors are
/// always reported by the slow path.
fn fast_parse(text: &str) -> Result<RawConfig, Box<dyn std::error::Error + Send + Sync>> {
    // Two tiers: our strict subset parser takes every config keyturn writes
    // in a fraction of the time and heap of `toml` (it borrows strings from
    // the text and keeps no tokens or spans); whatever it declines, even a
    // valid file, goes to `toml`, which reads all of TOML.
    let parse = || -> Result<RawConfig, Box<dyn std::error::Error + Send + Sync>> {
        let f = match fast_toml::from_str::<File>(text) {
            Ok(f) => f,
            Err(_) => toml::from_str::<File>(text)?,
        };
        Ok(into_raw(f))
    };
    // On a scratch thread: glibc gives it its own malloc arena, so the
    // parser's transient heap (hundreds of MB when `toml` does the work) is
    // handed back to the OS when freed instead of staying in the main arena
    // for the daemon's lifetime. Without a thread, parse here.
    std::thread::scope(|s| {
        match std::thread::Builder::new()
            .name("config-parse".into())
            .spawn_scoped(s, parse)
        {
            Ok(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
            Err(_) => parse(),
        }
    })
}

fn into_raw(f: File) -> RawConfig {
    RawConfig {
        daemon: f.daemon.map(Parsed::Ok),
        tiers: f
            .tiers
            .map(|t| t.into_iter().map(|(n, t)| (n, Parsed::Ok(t))).collect()),
        vaults: f
            .vaults
            .into_iter()
            .map(|(n, v)| (n, Parsed::Ok(v)))
            .collect(),
        agents: f
            .agents
            .into_iter()
            .map(|(name, a)| {
                let entry = RawAgentEntry {
                    agent: Parsed::Ok(RawAgent {
                        owner: a.owner,
                        tenant: a.tenant,
                        tier: a.tier,
                        uid: a.uid,
                        gid: a.gid,
                        credentials: None,
                    }),
                    credentials: a
                        .credentials
                        .into_iter()
                        .map(|(n, c)| (n, Parsed::Ok(c)))
                        .collect(),
                };
                (name, entry)
            })
            .collect(),
    }
}

/// Step 2: every section deserialized on its own; failures become issues and
/// [`Parsed::Invalid`] entries.
fn deserialize_sections(root: &Table) -> (RawConfig, Vec<Issue>) {
    let mut raw = RawConfig::default();
    let mut issues = Vec::new();
    let top = TomlPath::root();

    for (name, item) in root.iter() {
        let p = top.key(name);
        match name {
            "daemon" => raw.daemon = Some(section(item, &p, &mut issues)),
            "tiers" => {
                raw.tiers = Some(
                    entries(item, &p, &mut issues)
                        .into_iter()
                        .map(|(n, i)| {
                            let parsed = section(i, &p.key(&n), &mut issues);
                            (n, parsed)
                        })
                        .collect(),
                )
            }
            "vaults" => {
                raw.vaults = entries(item, &p, &mut issues)
                    .into_iter()
                    .map(|(n, i)| {
                        let parsed = section(i, &p.key(&n), &mut issues);
                        (n, parsed)
                    })
                    .collect()
            }
            "agents" => {
                for (agent_name, agent_item) in entries(item, &p, &mut issues) {
                    let ap = p.key(&agent_name);
                    let agent = section(&without_credentials(agent_item), &ap, &mut issues);
                    let credentials = match agent_item
                        .as_table_like()
                        .and_then(|t| t.get("credentials"))
                    {
                        Some(creds) => entries(creds, &ap.key("credentials"), &mut issues)
                            .into_iter()
                            .map(|(n, i)| {
                                let parsed =
                                    section(i, &ap.key("credentials").key(&n), &mut issues);
                                (n, parsed)
                            })
                            .collect(),
                        None => Default::default(),
                    };
                    raw.agents
                        .push((agent_name, RawAgentEntry { agent, credentials }));
                }
            }
            other => issues.push(Issue::at_key(
                p.clone(),
                format!(
                    "unknown key `{other}`; expected one of {}",
                    quoted(TOP_LEVEL_KEYS)
                ),
            )),
        }
    }
    (raw, issues)
}

/// An agent's table without its `credentials` sub-table, which is
/// deserialized credential by credential: cloning it along with the agent's
/// few scalar keys would copy every credential once more (seconds at 100k).
fn without_credentials(item: &Item) -> Item {
    let Some(t) = item.as_table_like() else {
        return item.clone();
    };
    let mut out = Table::new();
    for (k, v) in t.iter() {
        if k == "credentials" {
            continue;
        }
        if let Some((key, _)) = t.get_key_value(k) {
            out.insert_formatted(key, v.clone());
        }
    }
    Item::Table(out)
}

/// The `name → item` entries of a table of named sections.
fn entries<'a>(item: &'a Item, p: &TomlPath, issues: &mut Vec<Issue>) -> Vec<(String, &'a Item)> {
    match item.as_table_like() {
        Some(t) => t.iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        None => {
            issues.push(Issue::at(
                p.clone(),
                format!(
                    "expected a table of named entries, found {}",
                    item.type_name()
                ),
            ));
            Vec::new()
        }
    }
}

/// Deserializes one section, keeping spans (a `Value` deserializer over the
/// parsed item, not re-parsed text) and the path inside the section.
fn section<T: DeserializeOwned>(item: &Item, p: &TomlPath, issues: &mut Vec<Issue>) -> Parsed<T> {
    let value = match item.clone().into_value() {
        Ok(v) => v,
        Err(_) => {
            issues.push(Issue::at(p.clone(), "expected a value"));
            return Parsed::Invalid;
        }
    };
    match serde_path_to_error::deserialize::<_, T>(value.into_deserializer()) {
        Ok(t) => Parsed::Ok(t),
        Err(e) => {
            let mut path = p.clone();
            for seg in e.path().iter() {
                match seg {
                    serde_path_to_error::Segment::Map { key } => path = path.key(key),
                    serde_path_to_error::Segment::Seq { index } => path = path.index(*index),
                    // Enum variants of tagged sections are not TOML keys.
                    serde_path_to_error::Segment::Enum { .. }
                    | serde_path_to_error::Segment::Unknown => {}
                }
            }
            let inner = e.into_inner();
            issues.push(serde_issue(path, inner.message(), inner.span()));
            Parsed::Invalid
        }
    }
}

/// Rewrites serde's wording into the config's (keys, not fields) and points
/// an unknown key at the key itself.
fn serde_issue(mut path: TomlPath, message: &str, span: Option<Range<usize>>) -> Issue {
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((key, expected)) = rest.split_once('`')
    {
        let expected = expected.trim_start_matches(',').trim();
        let expected = if expected == "there are no fields" {
            "this table takes no other keys".to_owned()
        } else {
            expected.to_owned()
        };
        if path.segments().last() != Some(&Seg::Key(key.into())) {
            path = path.key(key);
        }
        return Issue::at_key(path, format!("unknown key `{key}`; {expected}"));
    }
    let message = if let Some(rest) = message.strip_prefix("unknown variant ") {
        format!(
            "unknown value {}",
            rest.replacen(", expected", "; expected", 1)
        )
    } else if let Some(rest) = message.strip_prefix("missing field ") {
        format!("missing key {rest}")
    } else {
        message.to_owned()
    };
    let message = plain_types(&message);
    let mut issue = Issue::at(path, message);
    issue.span = span;
    issue
}

/// serde names Rust types in "expected ..." (`struct RawTier`, `usize`);
/// say what to write in TOML instead.
fn plain_types(message: &str) -> String {
    const WORDS: &[(&str, &str)] = &[
        (
            "internally tagged enum RawGenerator",
            "a table with a `kind` key, e.g. { kind = \"password\" }",
        ),
        (
            "internally tagged enum RawSink",
            "a table with a `type` key, e.g. { type = \"file\", path = \"...\" }",
        ),
        (
            "internally tagged enum RawTarget",
            "a table with a `type` key, e.g. { type = \"none\" }",
        ),
        (
            "internally tagged enum RawVault",
            "a table with a `type` key, e.g. type = \"local\"",
        ),
        ("struct RawTier", "a table like { revocation_sla = \"1h\" }"),
        ("struct RawRetry", "a table"),
        ("struct RawDaemon", "a table"),
        ("struct RawAgent", "a table"),
        ("struct RawCredential", "a table"),
        ("expected usize", "expected a non-negative integer"),
        ("expected u32", "expected a non-negative integer"),
    ];
    let mut out = message.to_owned();
    for (rust, toml) in WORDS {
        out = out.replace(rust, toml);
    }
    out
}

fn quoted(items: &[&str]) -> String {
    items
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn to_error(file: &Path, text: &str, doc: &Document<&str>, issue: Issue) -> ConfigError {
    let span = locate(doc, &issue.path, issue.anchor).or(issue.span);
    let (line, column) = span.map(|s| line_col(text, s.start)).unwrap_or((0, 0));
    let mut message = issue.message;
    if let Some(related) = &issue.related
        && let Some(s) = locate(doc, related, Anchor::Value)
    {
        message.push_str(&format!(" (line {})", line_col(text, s.start).0));
    }
    ConfigError {
        file: file.to_path_buf(),
        line,
        column,
        toml_path: issue.path.to_string(),
        message,
    }
}

/// A node on the way down a TOML path.
#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Value(&'a Value),
    Table(&'a Table),
}

impl<'a> Node<'a> {
    fn table_like(self) -> Option<&'a dyn TableLike> {
        match self {
            Node::Item(i) => i.as_table_like(),
            Node::Value(v) => v.as_inline_table().map(|t| t as &dyn TableLike),
            Node::Table(t) => Some(t as &dyn TableLike),
        }
    }
    fn index(self, n: usize) -> Option<Node<'a>> {
        match self {
            Node::Item(Item::ArrayOfTables(a)) => a.get(n).map(Node::Table),
            Node::Item(Item::Value(Value::Array(a))) | Node::Value(Value::Array(a)) => {
                a.get(n).map(Node::Value)
            }
            _ => None,
        }
    }
    fn span(self) -> Option<Range<usize>> {
        match self {
            Node::Item(i) => i.span(),
            Node::Value(v) => v.span(),
            Node::Table(t) => t.span(),
        }
    }
}

/// The byte span a TOML path points at: the deepest node found, its value or
/// its key as the anchor asks. Implicit tables (`agents` in
/// `[agents.x]`) have no span of their own, so their key is used.
fn locate(doc: &Document<&str>, path: &TomlPath, anchor: Anchor) -> Option<Range<usize>> {
    let mut node = Node::Table(doc.as_table());
    let mut best: Option<Range<usize>> = None;
    let segs = path.segments();
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        match seg {
            Seg::Key(k) => {
                let Some((key, child)) = node.table_like().and_then(|t| t.get_key_value(k)) else {
                    break;
                };
                let key_span = key_span(key);
                let value_span = child.span();
                let here = if last && anchor == Anchor::Key {
                    key_span.or(value_span)
                } else {
                    value_span.or(key_span)
                };
                best = here.or(best);
                node = Node::Item(child);
            }
            Seg::Index(n) => {
                let Some(child) = node.index(*n) else { break };
                best = child.span().or(best);
                node = child;
            }
        }
    }
    best
}

fn key_span(key: &Key) -> Option<Range<usize>> {
    key.span()
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<ConfigError> {
        load_str(Path::new("/etc/keyturn/t.toml"), text)
            .expect_err("should fail")
            .0
    }

    #[test]
    fn line_col_counts_characters() {
        let t = "a\néé = 1\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 2), (2, 1));
        // After "éé " (5 bytes, 3 chars).
        assert_eq!(line_col(t, 7), (2, 4));
    }

    #[test]
    fn syntax_error_is_one_located_error() {
        let e = errors("[daemon]\nstate_dir = \n");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].line, 2);
        assert!(e[0].message.starts_with("TOML syntax error"), "{}", e[0]);
    }

    #[test]
    fn unknown_top_level_key_points_at_the_key() {
        let e = errors("\n[alerts.x]\ntype = \"webhook\"\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].line, e[0].column), (2, 2));
        assert_eq!(e[0].toml_path, "alerts");
        assert!(e[0].message.contains("unknown key `alerts`"));
    }

    #[test]
    fn unknown_key_in_a_tagged_inline_table_is_located_at_the_key() {
        let text = "[daemon]\ndelivery_roots = [\"/run/kt\"]\n[vaults.v]\ntype = \"local\"\n\
[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n\
[agents.a.credentials.c]\nvault = \"v\"\nevery = \"1h\"\ngenerate = { kind = \"ed25519\" }\n\
deliver = [{ type = \"file\", path = \"/run/kt/a/c\", colour = \"red\" }]\n";
        let e = errors(text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].toml_path, "agents.a.credentials.c.deliver[0].colour");
        assert_eq!(e[0].line, 13);
        assert_eq!(
            e[0].column,
            text.lines().nth(12).unwrap().find("colour").unwrap() + 1
        );
        assert!(e[0].message.contains("expected one of"), "{}", e[0].message);
    }

    #[test]
    fn summary_names_the_counts() {
        let cfg = load_str(
            Path::new("/etc/keyturn/t.toml"),
            "[vaults.v]\ntype = \"local\"\n[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n\
[agents.a.credentials.c]\nvault = \"v\"\nevery = \"1h\"\ngenerate = { kind = \"ed25519\" }\n",
        )
        .unwrap();
        let s = summary(&cfg);
        assert!(
            s.contains("1 agents, 1 credentials, 1 vaults, 4 tiers"),
            "{s}"
        );
        assert!(s.contains("state_dir: /var/lib/keyturn"), "{s}");
    }

    fn one_error(extra: &str) -> ConfigError {
        let base = "[vaults.v]\ntype = \"local\"\n[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n";
        let mut e = errors(&format!("{base}{extra}"));
        assert_eq!(e.len(), 1, "{e:?}");
        e.remove(0)
    }

    #[test]
    fn odd_shapes_are_located_errors_in_toml_words() {
        let e = one_error("credentials = 5\n");
        assert_eq!((e.line, e.toml_path.as_str()), (7, "agents.a.credentials"));
        assert!(
            e.message
                .contains("expected a table of named entries, found integer")
        );

        let e = one_error(
            "[agents.a.credentials.c]\nvault = \"v\"\nevery = \"1h\"\ngenerate = \"password\"\n",
        );
        assert_eq!((e.line, e.column), (10, 12));
        assert!(e.message.contains("a table with a `kind` key"), "{e}");
        assert!(!e.message.contains("Raw"), "no Rust type names: {e}");

        let e = one_error(
            "[agents.a.credentials.c]\nvault = \"v\"\nevery = \"1h\"\ngenerate = { kind = \"rsa\" }\n",
        );
        assert_eq!(e.toml_path, "agents.a.credentials.c.generate.kind");
        assert!(
            e.message
                .starts_with("unknown value `rsa`; expected one of `password`"),
            "{e}"
        );

        let e = one_error("[daemon]\nmax_concurrent_rotations = -1\n");
        assert_eq!(
            (e.line, e.toml_path.as_str()),
            (8, "daemon.max_concurrent_rotations")
        );
        assert!(e.message.contains("expected a non-negative integer"), "{e}");

        let e = one_error("[vaults.w]\nmax_concurrent = 1\n");
        assert_eq!((e.line, e.toml_path.as_str()), (7, "vaults.w"));
        assert_eq!(e.message, "missing key `type`");
    }

    #[test]
    fn arrays_of_tables_are_located_too() {
        let e = one_error(
            "[daemon]\ndelivery_roots = [\"/run/kt\"]\n[agents.a.credentials.c]\nvault = \"v\"\nevery = \"1h\"\n\
generate = { kind = \"ed25519\" }\n[[agents.a.credentials.c.deliver]]\ntype = \"file\"\npath = \"a/c\"\nextra = 1\n",
        );
        assert_eq!(e.toml_path, "agents.a.credentials.c.deliver[0].extra");
        assert_eq!((e.line, e.column), (16, 1));
    }

    #[test]
    fn a_bad_section_does_not_hide_the_others() {
        // The vault fails to deserialize; the credential that uses it must not
        // also be told the vault is unknown, but its own problem is reported.
        let text = "[vaults.v]\ntype = \"local\"\nmax_concurrent = \"many\"\n\
[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n\
[agents.a.credentials.c]\nvault = \"v\"\nevery = \"0s\"\ngenerate = { kind = \"ed25519\" }\n";
        let e = errors(text);
        let paths: Vec<&str> = e.iter().map(|e| e.toml_path.as_str()).collect();
        assert_eq!(paths, ["vaults.v", "agents.a.credentials.c.every"], "{e:?}");
    }

    /// Both paths must read a valid file the same way: every good fixture
    /// and every shipped config, compared field by field (Debug output).
    #[test]
    fn the_fast_path_reads_valid_files_exactly_like_the_located_path() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        for dir in ["tests/fixtures/config", "config", "config/examples"] {
            for e in std::fs::read_dir(root.join(dir)).unwrap() {
                let p = e.unwrap().path();
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                if p.extension().is_some_and(|x| x == "toml") && !name.starts_with("bad-") {
                    files.push(p);
                }
            }
        }
        assert!(files.len() >= 6, "{files:?}");
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            let ctx = Context {
                source: normalize(&f),
            };
            let raw = fast_parse(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            let fast =
                validate::validate(&raw, &ctx).unwrap_or_else(|e| panic!("{}: {e:?}", f.display()));
            let slow = load_located(&f, &text, &ctx).unwrap();
            assert_eq!(format!("{fast:?}"), format!("{slow:?}"), "{}", f.display());
        }
    }

    #[test]
    fn a_file_the_fast_path_rejects_is_reported_by_the_located_path() {
        let text = "[daemon]\nstate_dir = \"/tmp/x\"\nbogus = 1\n";
        assert!(fast_parse(text).is_err());
        let e = errors(text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].line, e[0].column), (3, 1));
        assert_eq!(e[0].toml_path, "daemon.bogus");
    }
}
