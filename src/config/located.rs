//! The slow path of reading a config, taken only when the fast one (one
//! serde pass per file, `load.rs`) fails: `toml_edit` keeps every span,
//! each section is deserialized on its own (steps 1, 2 and 4 of `load.rs`),
//! and every error is located in the file it is in.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use serde::de::{DeserializeOwned, IntoDeserializer};
use toml_edit::{Document, Item, Key, Table, TableLike, Value};

use super::Config;
use super::lines::LineIndex;
use super::load::{AGENTS_DIR, ConfigError, ConfigErrors, MAIN_FILE, SourceFile, merge_raw};
use super::raw::{Parsed, RawAgentEntry, RawConfig, TOP_LEVEL_KEYS};
use super::validate::{self, Anchor, Context, Issue, Seg, TomlPath};

/// The host's problems with a config (`host::host_problems`), for
/// [`load_located_with`].
pub(super) type HostCheck = fn(&Config) -> Vec<Issue>;

/// The slow path: spans kept, each section on its own, every error located
/// in the file it is in. With `host`, a config with errors also gets the host
/// checks of its settings that have none (black-box finding: `check`
/// listed a missing key file or group only once every other error was
/// fixed, where it is to list all at once). Not done for a config that
/// validates: its caller runs them.
pub(super) fn load_located_with(
    files: &[SourceFile],
    ctx: &Context,
    host: Option<HostCheck>,
) -> Result<(Config, Vec<Vec<String>>), ConfigErrors> {
    let mut docs = Vec::with_capacity(files.len());
    // Syntax errors, by file index. A file of `agents.d` that does not
    // parse is left out and the others are still checked (each holds its
    // own agents); the main file's vaults and tiers are what every agent
    // refers to, so when it does not parse, syntax errors are all there is
    // to say.
    let mut syntax: Vec<(usize, ConfigError)> = Vec::new();
    for (i, f) in files.iter().enumerate() {
        match Document::parse(f.text.as_str()) {
            Ok(doc) => docs.push(Some(doc)),
            Err(e) => {
                syntax.push((i, syntax_error(&f.path, &f.text, &e)));
                docs.push(None);
            }
        }
    }
    let main = match files.iter().position(|f| f.main) {
        Some(main) if docs[main].is_none() => {
            return Err(ConfigErrors(syntax.into_iter().map(|(_, e)| e).collect()));
        }
        Some(main) => main,
        // No main file (a directory of agents only): issues outside every
        // agent go to the first file that parsed.
        None => docs.iter().position(Option::is_some).unwrap_or(0),
    };

    let mut raw = RawConfig::default();
    let mut issues: Vec<(usize, Issue)> = Vec::new();
    // Where validation's findings may be the doing of a bad key taken out.
    let mut quiet: Vec<Quiet> = Vec::new();
    // Which file defines each agent, to locate the issues under it.
    let mut agent_file: std::collections::HashMap<String, usize> = Default::default();
    let mut names: Vec<Vec<String>> = vec![Vec::new(); files.len()];
    for (i, (f, doc)) in files.iter().zip(&docs).enumerate() {
        let Some(doc) = doc else { continue };
        let (mut more, found) = deserialize_sections(doc.as_table(), f.main);
        issues.extend(found.issues.into_iter().map(|issue| (i, issue)));
        quiet.extend(found.quiet);
        more.agents.retain(|(name, _)| match agent_file.get(name) {
            Some(first) => {
                issues.push((
                    i,
                    Issue::at_key(
                        TomlPath::root().key("agents").key(name),
                        format!(
                            "agent `{name}` is already defined in {}; an agent is defined in one file",
                            files[*first].path.display()
                        ),
                    ),
                ));
                false
            }
            None => {
                agent_file.insert(name.clone(), i);
                names[i].push(name.clone());
                true
            }
        });
        merge_raw(&mut raw, more);
    }
    raw.taken_out = quiet
        .iter()
        .flat_map(|q| q.under.iter().map(ToString::to_string))
        .collect();
    let (config, more) = validate::validate_all(&raw, ctx);
    if more.is_empty() && issues.is_empty() && syntax.is_empty() {
        return Ok((config, names));
    }
    let file_of = |path: &TomlPath| match path.segments() {
        [Seg::Key(top), Seg::Key(agent), ..] if &**top == "agents" => {
            agent_file.get(&**agent).copied().unwrap_or(main)
        }
        _ => main,
    };
    for issue in more {
        if quiet.iter().any(|q| q.covers(&issue.path)) {
            continue;
        }
        issues.push((file_of(&issue.path), issue));
    }
    if let Some(host) = host {
        let found: Vec<String> = issues.iter().map(|(_, i)| i.path.to_string()).collect();
        for issue in host(&config) {
            // Only where nothing else is wrong: a setting with an error
            // holds a placeholder, not what the file says.
            let scope = host_scope(&issue.path);
            // The audit log's default place is in the state directory.
            let also = (scope == "daemon.audit_log").then_some("daemon.state_dir");
            if found
                .iter()
                .any(|f| overlaps(f, &scope) || also.is_some_and(|a| overlaps(f, a)))
            {
                continue;
            }
            issues.push((file_of(&issue.path), issue));
        }
    }
    let lines: Vec<LineIndex> = files.iter().map(|f| LineIndex::new(&f.text)).collect();
    let mut errors: Vec<(usize, ConfigError)> = issues
        .into_iter()
        .filter_map(|(i, issue)| {
            let doc = docs[i].as_ref()?;
            Some((i, to_error(&files[i].path, &lines[i], doc, issue)))
        })
        .chain(syntax)
        .collect();
    errors.sort_by_key(|(i, e)| (*i, e.line, e.column));
    errors.dedup();
    Err(ConfigErrors(errors.into_iter().map(|(_, e)| e).collect()))
}

/// Locates `issues` in one file's text (issues found outside validation,
/// e.g. by [`host`](super::host)); an unparsable text locates them at its
/// start.
pub(super) fn locate_issues(file: &Path, text: &str, issues: Vec<Issue>) -> Vec<ConfigError> {
    let lines = LineIndex::new(text);
    let doc = Document::parse(text).unwrap_or_else(|_| Document::parse("").expect("empty TOML"));
    issues
        .into_iter()
        .map(|issue| to_error(file, &lines, &doc, issue))
        .collect()
}

fn syntax_error(file: &Path, text: &str, e: &toml_edit::TomlError) -> ConfigError {
    let offset = match e.span() {
        Some(span) => span.start,
        None => unspanned_error_offset(text, e.message()),
    };
    let (line, column) = LineIndex::new(text).line_col(offset);
    // toml_edit splits its message over lines; one line reads better after
    // `file:line:col:`.
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
    ConfigError {
        file: file.to_path_buf(),
        line,
        column,
        toml_path: String::new(),
        message: format!("TOML syntax error: {message}"),
    }
}

/// Where a syntax error the parser gives no span for happens (its nesting
/// limit: a table or array nested too deep). The parser reads from the
/// start, so the error first appears for some prefix of the text and for
/// every longer one: the shortest such prefix ends at the place, found by
/// a binary search over the text with the parser itself (a few dozen
/// parses, only for this rare error).
fn unspanned_error_offset(text: &str, message: &str) -> usize {
    let same_error = |end: usize| matches!(Document::parse(&text[..end]), Err(e) if e.span().is_none() && e.message() == message);
    let (mut lo, mut hi) = (0, text.len());
    if !same_error(hi) {
        return 0;
    }
    // Invariant: the prefix ending at `hi` has the error, the one ending at
    // `lo` does not.
    while hi - lo > 1 {
        let mut mid = lo + (hi - lo) / 2;
        while !text.is_char_boundary(mid) {
            mid += 1;
        }
        if mid >= hi {
            break;
        }
        if same_error(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    // The last character of the shortest prefix is where it went too deep.
    let mut at = hi.saturating_sub(1);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// Step 2: every section deserialized on its own; failures become issues and
/// [`Parsed::Invalid`] entries. A file of `agents.d` (`main` false) holds
/// agents only.
fn deserialize_sections(root: &Table, main: bool) -> (RawConfig, Found) {
    let mut raw = RawConfig::default();
    let mut issues = Found::default();
    let top = TomlPath::root();

    for (name, item) in root.iter() {
        let p = top.key(name);
        if !main && name != "agents" {
            issues.push(Issue::at_key(
                p.clone(),
                format!(
                    "`{name}` belongs in {MAIN_FILE}; a file in {AGENTS_DIR} holds only [agents.NAME] tables"
                ),
            ));
            continue;
        }
        match name {
            "daemon" => raw.daemon = Some(section(item, &p, &mut issues)),
            "alert_rules" => raw.alert_rules = Some(section(item, &p, &mut issues)),
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
            "issuers" => {
                raw.issuers = entries(item, &p, &mut issues)
                    .into_iter()
                    .map(|(n, i)| {
                        let parsed = section(i, &p.key(&n), &mut issues);
                        (n, parsed)
                    })
                    .collect()
            }
            "token_service" => token_service(item, &p, &mut issues, &mut raw),
            "policies" => {
                raw.policies = entries(item, &p, &mut issues)
                    .into_iter()
                    .map(|(n, i)| {
                        let parsed = section(i, &p.key(&n), &mut issues);
                        (n, parsed)
                    })
                    .collect()
            }
            "alerts" => {
                raw.alerts = entries(item, &p, &mut issues)
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

/// What deserializing the sections found: the issues, and where
/// validation is to stay quiet.
#[derive(Default)]
struct Found {
    issues: Vec<Issue>,
    quiet: Vec<Quiet>,
}

impl Found {
    fn push(&mut self, issue: Issue) {
        self.issues.push(issue);
    }
    fn len(&self) -> usize {
        self.issues.len()
    }
}

/// A section read with bad keys taken out (or missing ones stood in for):
/// validation's findings about the section itself, or at or under one of
/// those keys, may be the removal's doing.
struct Quiet {
    section: TomlPath,
    under: Vec<TomlPath>,
}

impl Quiet {
    fn covers(&self, path: &TomlPath) -> bool {
        *path == self.section
            || self
                .under
                .iter()
                .any(|u| path.segments().starts_with(u.segments()))
    }
}

/// The `name → item` entries of a table of named sections.
/// `[token_service]`: each `subject_issuers.NAME` and `clients.AGENT`
/// deserialized on its own, the scalar keys together.
fn token_service(item: &Item, p: &TomlPath, issues: &mut Found, raw: &mut RawConfig) {
    let mut out = BTreeMap::new();
    let mut settings = toml_edit::Table::new();
    for (key, sub) in entries(item, p, issues) {
        let sp = p.key(&key);
        if crate::oauth::config::TOKEN_SERVICE_SETTINGS.contains(&key.as_str()) {
            settings.insert(&key, sub.clone());
            continue;
        }
        if key == "clients" {
            for (name, i) in entries(sub, &sp, issues) {
                let parsed = section(i, &sp.key(&name), issues);
                raw.token_clients.insert(name, parsed);
            }
            continue;
        }
        if key == "tenants" {
            for (name, i) in entries(sub, &sp, issues) {
                let parsed = section(i, &sp.key(&name), issues);
                raw.token_tenants.insert(name, parsed);
            }
            continue;
        }
        if key != "subject_issuers" {
            issues.push(Issue::at_key(
                sp,
                format!(
                    "unknown key `{key}`; expected one of {}",
                    crate::oauth::config::TOKEN_SERVICE_KEYS
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
            continue;
        }
        for (name, i) in entries(sub, &sp, issues) {
            let parsed = section(i, &sp.key(&name), issues);
            out.insert(name, parsed);
        }
    }
    raw.subject_issuers = out;
    if !settings.is_empty() {
        raw.token_settings = Some(section(&Item::Table(settings), p, issues));
    }
}

fn entries<'a>(item: &'a Item, p: &TomlPath, issues: &mut Found) -> Vec<(String, &'a Item)> {
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
///
/// serde stops at a section's first error. So that every bad key of a
/// section is reported at once, the key an error names is taken out and the
/// section read again, up to [`MAX_ISSUES_PER_SECTION`] times. A key taken
/// out is not reported again as missing, nor is a missing key of a table
/// that had an unknown one, and an error that names no key after one was
/// taken out is not reported: it may be the removal's doing. A missing key
/// gets a stand-in value (see [`stand_in`]) so that the section's other
/// missing keys are found in the same pass; what the stand-in itself gets
/// wrong is not reported. The section as read is still validated (see
/// [`Quiet`]), so that a type error does not hide its other errors.
fn section<T: DeserializeOwned>(item: &Item, p: &TomlPath, issues: &mut Found) -> Parsed<T> {
    let mut value = match item.clone().into_value() {
        Ok(v) => v,
        Err(_) => {
            issues.push(Issue::at(p.clone(), "expected a value"));
            return Parsed::Invalid;
        }
    };
    let original = value.clone();
    let mut removed: Vec<TomlPath> = Vec::new();
    let mut unknown_in: Vec<TomlPath> = Vec::new();
    // Arrays elements were taken out of: the original positions of the
    // elements left, so that later errors name the elements as written.
    let mut left: Vec<(Vec<Seg>, Vec<usize>)> = Vec::new();
    // Whether every key taken out was an unknown one (a typo): without it
    // the section means what it says, so it is still validated and its
    // other errors reported now rather than after the typo is fixed.
    let mut only_unknown = true;
    // Keys put in for missing ones, with the stand-in they hold now.
    let mut stand_ins: Vec<(Vec<Seg>, usize)> = Vec::new();
    let reported_before = issues.len();
    for _ in 0..MAX_READS_PER_SECTION {
        if issues.len() - reported_before >= MAX_ISSUES_PER_SECTION {
            break;
        }
        let e = match serde_path_to_error::deserialize::<_, T>(value.clone().into_deserializer()) {
            Ok(t) if (removed.is_empty() || only_unknown) && stand_ins.is_empty() => {
                return Parsed::Ok(t);
            }
            // Keys of the wrong type were taken out, or stand in for
            // missing ones: the rest of the section is still validated, so
            // that its other errors are reported now too. What validation
            // finds at a key taken out or stood in for, or about the
            // section as a whole, may be the removal's doing: not reported.
            // Elements taken out of an array shift the others, whose
            // findings would name the wrong element: nothing validation
            // finds in such an array is reported.
            Ok(t) => {
                let inside = |at: &[Seg]| {
                    let mut q = p.clone();
                    q.0.extend(at.iter().cloned());
                    q
                };
                issues.quiet.push(Quiet {
                    section: p.clone(),
                    under: removed
                        .iter()
                        .cloned()
                        .chain(stand_ins.iter().map(|(at, _)| inside(at)))
                        .chain(left.iter().map(|(array, _)| inside(array)))
                        .collect(),
                });
                return Parsed::Ok(t);
            }
            Err(e) => e,
        };
        let mut inside: Vec<Seg> = Vec::new();
        for seg in e.path().iter() {
            match seg {
                serde_path_to_error::Segment::Map { key } => {
                    inside.push(Seg::Key(key.as_str().into()))
                }
                serde_path_to_error::Segment::Seq { index } => inside.push(Seg::Index(*index)),
                // Enum variants of tagged sections are not TOML keys.
                serde_path_to_error::Segment::Enum { .. }
                | serde_path_to_error::Segment::Unknown => {}
            }
        }
        // As in the value being read (array positions as they are now).
        let read_at = inside.clone();
        // The deepest stand-in the error is at or under: its own doing.
        let in_stand_in = stand_ins
            .iter()
            .enumerate()
            .filter(|(_, (at, _))| read_at.starts_with(at))
            .max_by_key(|(_, (at, _))| at.len())
            .map(|(i, _)| i);
        // The first array on the way (a credential's `deliver`), where the
        // element at `now` is `written` in the file.
        let element = inside
            .iter()
            .position(|seg| matches!(seg, Seg::Index(_)))
            .map(|at| {
                let Seg::Index(now) = inside[at] else {
                    unreachable!("an index")
                };
                let array = inside[..at].to_vec();
                let written = left
                    .iter()
                    .find(|(a, _)| *a == array)
                    .map_or(now, |(_, orig)| orig.get(now).copied().unwrap_or(now));
                inside[at] = Seg::Index(written);
                (at, array, now)
            });
        let mut path = p.clone();
        path.0.extend(inside.iter().cloned());
        let inner = e.into_inner();
        let missing = inner
            .message()
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(key, _)| path.key(key));
        let unknown = inner.message().starts_with("unknown field `");
        let variant = first_expected_variant(inner.message()).map(str::to_owned);
        let table = path.clone();
        let issue = serde_issue(path, inner.message(), inner.span());
        // An unknown tag (`generate`'s `kind`, a target's `type`): the
        // table gets a known one in its place, alone, so that the rest of
        // the section is still read and validated; what validation finds
        // under the table is then the stand-in's doing, and stays quiet.
        if in_stand_in.is_none()
            && let Some(variant) = variant
            && let Some((Seg::Key(tag), tagged)) = read_at.split_last()
            && !tagged.is_empty()
            && !tagged.iter().any(|seg| matches!(seg, Seg::Index(_)))
            && let Some(at) = walk(&mut value, tagged)
        {
            let mut alone = toml_edit::InlineTable::new();
            alone.insert(&**tag, variant.as_str().into());
            *at = alone.into();
            issues.push(issue);
            stand_ins.push((tagged.to_vec(), LAST_STAND_IN));
            continue;
        }
        let inside = &issue.path.segments()[p.segments().len().min(issue.path.segments().len())..];
        if let Some(key) = &missing {
            // Not when the key was taken out, nor when an unknown key was
            // taken out of the same table: that is most likely the missing
            // one misspelled, and its error lists the keys to choose from.
            let report =
                in_stand_in.is_none() && !removed.contains(key) && !unknown_in.contains(&table);
            // In an array's element, the other elements still get read;
            // elsewhere the key gets a stand-in and the table is read on.
            match element.clone().filter(|_| in_stand_in.is_none()) {
                Some((at, array, now)) => {
                    if report {
                        issues.push(issue);
                    }
                    if !take_out_element(&mut value, &mut left, array, now) {
                        return Parsed::Invalid;
                    }
                    let mut gone = p.clone();
                    gone.0.extend(
                        table.segments()[p.segments().len()..][..=at]
                            .iter()
                            .cloned(),
                    );
                    removed.push(gone);
                    continue;
                }
                None => {
                    let Some(Seg::Key(name)) = key.segments().last() else {
                        if report {
                            issues.push(issue);
                        }
                        return Parsed::Invalid;
                    };
                    let mut at = read_at.clone();
                    at.push(Seg::Key(name.clone()));
                    if stand_in(&mut value, &original, &at, 0) {
                        if report {
                            issues.push(issue);
                        }
                        stand_ins.push((at, 0));
                        continue;
                    }
                    if in_stand_in.is_none() {
                        if report {
                            issues.push(issue);
                        }
                        return Parsed::Invalid;
                    }
                    // The stand-in the key is missing from takes no keys
                    // (an array for a tagged table): it is of the wrong
                    // type, and gets the next one below.
                }
            }
        }
        if let Some(i) = in_stand_in {
            // The stand-in is of the wrong type: the next one, in place of
            // it and of any stand-in put inside it.
            let (mut at, mut tried) = stand_ins[i].clone();
            loop {
                stand_ins.retain(|(other, _)| !other.starts_with(&at));
                if stand_in(&mut value, &original, &at, tried + 1) {
                    stand_ins.push((at, tried + 1));
                    break;
                }
                // No type fits (an enum's tag: its values are not known
                // here). A stand-in it is in gets its next type; a table
                // of the file it is missing from is taken out, as a bad
                // key would be, so that the keys after it are read.
                let table = at[..at.len() - 1].to_vec();
                if let Some(outer) = stand_ins.iter().find(|(other, _)| *other == table) {
                    (at, tried) = outer.clone();
                    continue;
                }
                if table.is_empty() || !remove_key(&mut value, &table) {
                    return Parsed::Invalid;
                }
                let mut gone = p.clone();
                gone.0.extend(table);
                removed.push(gone);
                break;
            }
            continue;
        }
        if unknown {
            // The issue's path ends in the unknown key (serde's may or may not).
            let mut parent = issue.path.clone();
            parent.0.pop();
            unknown_in.push(parent);
        }
        if (!removed.is_empty() || !stand_ins.is_empty()) && inside.is_empty() {
            return Parsed::Invalid;
        }
        // An error in an array's element (a sink of `deliver`) takes that
        // element out; the others keep their written positions (`left`).
        only_unknown &= unknown && element.is_none();
        let (taken_out, keep) = match element {
            Some((at, array, now)) => (take_out_element(&mut value, &mut left, array, now), at + 1),
            None => (remove_key(&mut value, inside), inside.len()),
        };
        let mut gone = issue.path.clone();
        gone.0.truncate(p.segments().len() + keep);
        removed.push(gone);
        issues.push(issue);
        if !taken_out {
            return Parsed::Invalid;
        }
    }
    Parsed::Invalid
}

/// Takes the element at position `now` out of the array at `array`
/// (relative to `value`), and out of that array's record of written
/// positions in `left`; false when there is no such element.
fn take_out_element(
    value: &mut Value,
    left: &mut Vec<(Vec<Seg>, Vec<usize>)>,
    array: Vec<Seg>,
    now: usize,
) -> bool {
    let Some(elements) = walk(value, &array)
        .and_then(Value::as_array_mut)
        .filter(|a| now < a.len())
    else {
        return false;
    };
    let len = elements.len();
    elements.remove(now);
    let i = match left.iter().position(|(a, _)| *a == array) {
        Some(i) => i,
        None => {
            left.push((array, (0..len).collect()));
            left.len() - 1
        }
    };
    left[i].1.remove(now);
    true
}

/// How many errors one section reports at the most.
const MAX_ISSUES_PER_SECTION: usize = 32;

/// How many times one section is read at the most: once per error, and
/// once per stand-in tried.
const MAX_READS_PER_SECTION: usize = 128;

/// The last of [`stand_in`]'s values: after it, none fits.
const LAST_STAND_IN: usize = 5;

/// The first value serde's "unknown variant `x`, expected one of `a`,
/// `b`" (or "expected `a`") names.
fn first_expected_variant(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown variant `")?;
    let (_, expected) = rest.split_once("expected ")?;
    let expected = expected.strip_prefix("one of ").unwrap_or(expected);
    expected.strip_prefix('`')?.split_once('`').map(|(v, _)| v)
}

/// Puts the `nth` stand-in value at `path` (relative to `value`, whose
/// parent table must exist): a value of each TOML type in turn, so that
/// one of them reads as the missing key's type. False when every type was
/// tried, or the parent is not a table.
fn stand_in(value: &mut Value, original: &Value, path: &[Seg], nth: usize) -> bool {
    let stand_in: Value = match nth {
        0 => "".into(),
        1 => 0i64.into(),
        2 => false.into(),
        3 => toml_edit::InlineTable::new().into(),
        4 => toml_edit::Array::new().into(),
        // The table as written with only its tag (`generate`'s `kind`, a
        // target's `type`): a tagged table whose other keys are wrong
        // (serde names only the table) then reads, and the section's
        // other keys are still checked.
        LAST_STAND_IN => {
            let mut original = original.clone();
            let Some(written) = walk(&mut original, path).and_then(Value::as_inline_table_mut)
            else {
                return false;
            };
            let mut tag = toml_edit::InlineTable::new();
            for key in ["kind", "type"] {
                if let Some(v) = written.get(key) {
                    tag.insert(key, v.clone());
                }
            }
            if tag.is_empty() {
                return false;
            }
            tag.into()
        }
        _ => return false,
    };
    let Some((Seg::Key(last), parents)) = path.split_last() else {
        return false;
    };
    walk(value, parents)
        .and_then(Value::as_inline_table_mut)
        .map(|t| t.insert(&**last, stand_in))
        .is_some()
}

/// Takes the key at `path` (relative to `value`) out; false when the path
/// does not end in a key or leads nowhere.
fn remove_key(value: &mut Value, path: &[Seg]) -> bool {
    let Some((Seg::Key(last), parents)) = path.split_last() else {
        return false;
    };
    walk(value, parents)
        .and_then(Value::as_inline_table_mut)
        .is_some_and(|t| t.remove(last).is_some())
}

/// The value at `path` (relative to `value`), if there is one.
fn walk<'v>(value: &'v mut Value, path: &[Seg]) -> Option<&'v mut Value> {
    path.iter().try_fold(value, |at, seg| match seg {
        Seg::Key(k) => at.as_inline_table_mut()?.get_mut(k),
        Seg::Index(i) => at.as_array_mut()?.get_mut(*i),
    })
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
            "internally tagged enum SinkConfig",
            "a table with a `type` key, e.g. { type = \"file\", path = \"...\" }",
        ),
        (
            "internally tagged enum TargetConfig",
            "a table with a `type` key, e.g. { type = \"none\" }",
        ),
        (
            "internally tagged enum VaultSpec",
            "a table with a `type` key, e.g. type = \"local\"",
        ),
        ("struct RawTier", "a table like { revocation_sla = \"1h\" }"),
        ("struct RawRetry", "a table"),
        ("struct RawDaemon", "a table"),
        ("struct RawAgent", "a table"),
        ("struct RawCredential", "a table"),
        ("expected usize", "expected a non-negative integer"),
        ("expected u32", "expected an integer from 0 to 4294967295"),
    ];
    let mut out = message.to_owned();
    for (rust, toml) in WORDS {
        out = out.replace(rust, toml);
    }
    // Any other struct is a plug-in's config section: a table.
    while let Some(at) = out.find("struct ") {
        let name_len = out[at + 7..]
            .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .unwrap_or(out.len() - at - 7);
        out.replace_range(at..at + 7 + name_len, "a table");
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

fn to_error(file: &Path, lines: &LineIndex, doc: &Document<&str>, issue: Issue) -> ConfigError {
    // Every issue is under a key of the document; should one ever not be
    // found, it is reported at the file's start rather than at 0:0.
    let span = locate(doc, &issue.path, issue.anchor).or(issue.span);
    let (line, column) = lines.line_col(span.map_or(0, |s| s.start));
    let mut message = issue.message;
    if let Some(related) = &issue.related
        && let Some(s) = locate_whole(doc, related, Anchor::Value)
    {
        message.push_str(&format!(" (line {})", lines.line_col(s.start).0));
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
    locate_in(doc, path, anchor).0
}

/// Where `path` is in `doc`, only if all of it is there: a setting of
/// another file of the config (an `agents.d` file) is not, and the
/// nearest table above it here is no place to point at (black-box
/// finding: "also used by ... (line 1)" for a credential in another file).
fn locate_whole(doc: &Document<&str>, path: &TomlPath, anchor: Anchor) -> Option<Range<usize>> {
    match locate_in(doc, path, anchor) {
        (span, true) => span,
        (_, false) => None,
    }
}

/// [`locate`], and whether every segment of `path` was found.
fn locate_in(
    doc: &Document<&str>,
    path: &TomlPath,
    anchor: Anchor,
) -> (Option<Range<usize>>, bool) {
    let mut node = Node::Table(doc.as_table());
    let mut best: Option<Range<usize>> = None;
    let segs = path.segments();
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        match seg {
            Seg::Key(k) => {
                let Some((key, child)) = node.table_like().and_then(|t| t.get_key_value(k)) else {
                    return (best, false);
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
                let Some(child) = node.index(*n) else {
                    return (best, false);
                };
                best = child.span().or(best);
                node = child;
            }
        }
    }
    (best, true)
}

fn key_span(key: &Key) -> Option<Range<usize>> {
    key.span()
}

/// What a host problem at `path` depends on: the daemon setting itself, a
/// whole vault or alert sink, or the whole credential of a program.
fn host_scope(path: &TomlPath) -> String {
    let keep = match path.segments() {
        [Seg::Key(top), ..] if &**top == "daemon" => 2,
        [Seg::Key(top), ..] if &**top == "agents" => 4,
        _ => 2,
    };
    let mut scope = TomlPath::root();
    for seg in path.segments().iter().take(keep) {
        scope = match seg {
            Seg::Key(k) => scope.key(k.to_string()),
            Seg::Index(i) => scope.index(*i),
        };
    }
    scope.to_string()
}

/// Whether one of two TOML paths is the other or lies under it.
fn overlaps(a: &str, b: &str) -> bool {
    let under = |long: &str, short: &str| {
        short.is_empty()
            || long == short
            || (long.starts_with(short) && matches!(long.as_bytes()[short.len()], b'.' | b'['))
    };
    under(a, b) || under(b, a)
}
