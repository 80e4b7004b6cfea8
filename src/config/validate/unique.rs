//! What must be unique across the config (vault paths, delivery places)
//! and the scopes plug-ins check their sections in.

use std::os::unix::ffi::OsStrExt;

use super::*;

/// What a vault's `check` knows besides its own section.
pub struct VaultScope<'a> {
    /// Its `[vaults.NAME]` name.
    pub name: &'a str,
    /// `daemon.state_dir`, where the local vault keeps its data by default.
    pub state_dir: &'a Path,
}

/// What a sink's `check` knows besides its own entry: the credential it
/// delivers, the delivery roots, and the places other sinks already write.
pub struct SinkScope<'s, 'r> {
    /// The credential's name (e.g. to derive a variable name).
    pub credential: &'r str,
    /// The agent's name.
    pub agent: &'r str,
    /// Whether the credential is an ed25519 keypair (delivered as a bundle).
    pub keypair: bool,
    /// Every agent in the file, by name.
    pub(super) agent_names: &'s HashMap<&'r str, &'r super::super::raw::RawAgentEntry>,
    /// `daemon.delivery_roots`; `None` when `[daemon]` itself was invalid
    /// (root checks are skipped rather than reported against unknown roots).
    pub roots: Option<&'s [PathBuf]>,
    pub(super) at: SinkRef<'r>,
    pub(super) claims: &'s mut Deliveries<'r>,
}

impl SinkScope<'_, '_> {
    /// Whether `name` is the name of an agent other than this sink's: a
    /// directory of that name right below a delivery root is that agent's.
    pub fn is_other_agent(&self, name: &str) -> bool {
        name != self.agent && self.agent_names.contains_key(name)
    }

    /// Whether the file defines credential `credential` of agent `agent`
    /// (for a sink that refers to another credential).
    pub fn is_credential(&self, agent: &str, credential: &str) -> bool {
        self.agent_names
            .get(agent)
            .is_some_and(|a| a.credentials.iter().any(|(c, _)| c == credential))
    }

    /// How many bytes the values of credential `agent/credential` have, as
    /// its generator says (`None`: unknown, or a keypair's PEM, longer than
    /// any key minimum). For a sink keying something with that value.
    pub fn value_len(&self, agent: &str, credential: &str) -> Option<usize> {
        let a = self.agent_names.get(agent)?;
        let (_, c) = a.credentials.iter().find(|(c, _)| c == credential)?;
        // 32 when unset, as for the credential itself.
        Some(match &c.ok()?.generate {
            RawGenerator::Password { length, .. } => length.unwrap_or(32),
            RawGenerator::RandomBytes { length, encoding } => {
                let n = length.unwrap_or(32);
                match encoding.unwrap_or(RawEncoding::Hex) {
                    RawEncoding::Hex => 2 * n,
                    RawEncoding::Base64Url => (4 * n).div_ceil(3),
                }
            }
            RawGenerator::ApiKey { prefix, length } => {
                prefix.as_ref().map_or(0, String::len) + length.unwrap_or(32)
            }
            RawGenerator::Ed25519 {} => return None,
        })
    }

    /// `true` the first time it is asked in a file: "there are no delivery
    /// roots" is said once, not for every sink.
    pub fn first_to_miss_roots(&mut self) -> bool {
        !std::mem::replace(&mut self.claims.missing_roots_reported, true)
    }

    /// Records that the place just claimed is in `dir`, the directory the
    /// file sink gives its agent (a prefix of the place), checked once
    /// every place is claimed ([`Deliveries::shared_agent_dirs`]). Only
    /// an agent with a `uid` is given its directory.
    pub fn claim_agent_dir(&mut self, dir: &Path) {
        let gets_it = self
            .agent_names
            .get(self.agent)
            .and_then(|a| a.agent.ok())
            .is_some_and(|a| a.uid.is_some());
        let Some(index) = self.claims.seen.entries.len().checked_sub(1) else {
            return;
        };
        if gets_it {
            self.claims.agent_dirs.push((index, dir.as_os_str().len()));
        }
    }

    /// Claims `place` (where this sink writes, e.g. a resolved file path)
    /// for this sink alone; reports a duplicate at `at` when another sink
    /// claimed it first. `key` is the sink's key `at` points to.
    pub fn claim(
        &mut self,
        v: &mut Validator<'_>,
        at: Loc<'_>,
        key: &'static str,
        place: &Path,
    ) -> bool {
        let bytes = place.as_os_str().as_encoded_bytes();
        let claims = &mut *self.claims;
        // Places are kept in one buffer, not one allocation each (100k sinks).
        let range = claims.text.len()..claims.text.len() + bytes.len();
        claims.text.extend_from_slice(bytes);
        let text = &claims.text;
        let first = claims.seen.first_or_insert(
            fnv1a(FNV_OFFSET, bytes),
            (self.at, key, range.clone()),
            |earlier, new| text[earlier.2.clone()] == text[new.2.clone()],
        );
        let Some((first_at, first_key, _)) = first else {
            return self.claim_unnested(v, at, place, range);
        };
        let first = first_at.path(first_key);
        claims.text.truncate(range.start);
        let mut issue = Issue::at(
            at.path(),
            format!(
                "duplicate delivery path `{}`: also written by `{first}`",
                place.display(),
            ),
        );
        issue.related = Some(first);
        v.issues.push(issue);
        false
    }

    /// The place just claimed (`range` in the claims' text) must not be
    /// inside another sink's place, nor hold one: a file sink's file (or a
    /// keypair's bundle directory) at `/a/b` and another's at `/a/b/c`
    /// would replace each other's files at every delivery. Records the
    /// place's directories for the claims after it.
    fn claim_unnested(
        &mut self,
        v: &mut Validator<'_>,
        at: Loc<'_>,
        place: &Path,
        range: Range<usize>,
    ) -> bool {
        let claims = &mut *self.claims;
        let index = claims.seen.entries.len() - 1;
        let text = &claims.text;
        let bytes = &text[range.clone()];
        // Above it: its directories (byte prefixes of a normal path),
        // one of which another sink writes.
        let above = place.ancestors().skip(1).find_map(|dir| {
            let dir = &bytes[..dir.as_os_str().len()];
            claims
                .seen
                .find(fnv1a(FNV_OFFSET, dir), |(_, _, r)| text[r.clone()] == *dir)
                .map(|(sink, key, _)| (sink.path(key), dir))
        });
        // Below it: the first place claimed inside it.
        let below = claims
            .dirs
            .find(fnv1a(FNV_OFFSET, bytes), |&(i, n)| {
                let r = &claims.seen.entries[i].0.2;
                text[r.start..r.start + n] == *bytes
            })
            .map(|&(i, _)| {
                let (sink, key, r) = &claims.seen.entries[i].0;
                (sink.path(key), &text[r.clone()])
            });
        let clash = match (above, below) {
            (Some((other, dir)), _) => Some((other, "is inside", dir)),
            (None, Some((other, inside))) => Some((other, "is a directory above", inside)),
            (None, None) => None,
        };
        if let Some((other, relation, theirs)) = clash {
            let mut issue = Issue::at(
                at.path(),
                format!(
                    "delivery path `{}` {relation} another sink's place `{}` (each delivery would \
                     replace the other's files; give each sink a path outside the other's): written by `{other}`",
                    place.display(),
                    Path::new(std::ffi::OsStr::from_bytes(theirs)).display(),
                ),
            );
            issue.related = Some(other);
            v.issues.push(issue);
            return false;
        }
        // Its directories, each with the first place below it (a directory
        // already recorded has its own recorded above it).
        for dir in place.ancestors().skip(1) {
            let n = dir.as_os_str().len();
            if n == 0 {
                break;
            }
            let dir = &claims.text[range.start..range.start + n];
            let seen = &claims.seen;
            let text = &claims.text;
            let recorded = claims.dirs.first_or_insert(
                fnv1a(FNV_OFFSET, dir),
                (index, n),
                |&(i, n1), &(j, n2)| {
                    let (a, b) = (&seen.entries[i].0.2, &seen.entries[j].0.2);
                    n1 == n2 && text[a.start..a.start + n1] == text[b.start..b.start + n2]
                },
            );
            if recorded.is_some() {
                break;
            }
        }
        true
    }
}

/// Uniqueness maps shared by every credential. They borrow names from the
/// raw file (`'r`) rather than copying them.
pub(super) struct CrossChecks<'r> {
    pub(super) vault_paths: FirstSeen<VaultPathSeen<'r>>,
    pub(super) deliveries: Deliveries<'r>,
    /// Each postgres role a target sets passwords on (its admin DSN file
    /// and its name), with the first credential whose target it is.
    pub(super) target_roles: HashMap<(PathBuf, String), CredRef<'r>>,
}

/// The places sinks write, each with the first sink that claimed it.
#[derive(Default)]
pub(super) struct Deliveries<'r> {
    pub(super) seen: FirstSeen<(SinkRef<'r>, &'static str, Range<usize>)>,
    /// Every directory above a claimed place, with the first place claimed
    /// below it: its index in `seen.entries` and the directory's length (a
    /// prefix of that place's text).
    pub(super) dirs: FirstSeen<(usize, usize)>,
    /// Every claimed place, back to back.
    pub(super) text: Vec<u8>,
    pub(super) missing_roots_reported: bool,
    /// Each claimed place (its index in `seen.entries`) with the length of
    /// the directory the file sink gives its agent (a prefix of its text),
    /// when that agent has a `uid`: see [`Deliveries::shared_agent_dirs`].
    pub(super) agent_dirs: Vec<(usize, usize)>,
}

impl Deliveries<'_> {
    /// Black-box finding: two agents delivering into one directory not
    /// named after either (`shared/a.json`, `shared/b.json`) passed
    /// `check`; the file sink gave the directory to the agent with a `uid`,
    /// which could then replace the other agent's file. An agent's
    /// directory (the one named after it right below a root, else the one
    /// holding its file or bundle) is given to it when it has a `uid`; no
    /// other agent's place may be in it. One issue per such directory, at
    /// its first place. Sorted once, so 100k sinks cost O(n log n).
    pub(super) fn shared_agent_dirs(&self) -> Vec<Issue> {
        if self.agent_dirs.is_empty() {
            return Vec::new();
        }
        let entries = &self.seen.entries;
        let place = |i: usize| &self.text[entries[i].0.2.clone()];
        let agent = |i: usize| entries[i].0.0.cred.agent;
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_unstable_by(|&a, &b| place(a).cmp(place(b)));
        // For each position, the first later position of another agent.
        let mut next_other = vec![order.len(); order.len()];
        for k in (0..order.len().saturating_sub(1)).rev() {
            next_other[k] = if agent(order[k + 1]) != agent(order[k]) {
                k + 1
            } else {
                next_other[k + 1]
            };
        }
        let mut issues = Vec::new();
        let mut reported = std::collections::HashSet::new();
        for &(e, len) in &self.agent_dirs {
            let dir = &place(e)[..len];
            let owner = agent(e);
            // The places below `dir/`: from `dir/` up to (not) `dir0`, in
            // the bytes' order (`0` follows `/`).
            let bound = |last: u8| [dir, &[last]].concat();
            let (from, to) = (bound(b'/'), bound(b'/' + 1));
            let lo = order.partition_point(|&i| place(i) < from.as_slice());
            let hi = order.partition_point(|&i| place(i) < to.as_slice());
            if lo >= hi {
                continue;
            }
            let other = if agent(order[lo]) != owner {
                order[lo]
            } else if next_other[lo] < hi {
                order[next_other[lo]]
            } else {
                continue;
            };
            if !reported.insert(dir) {
                continue;
            }
            let (sink, key, _) = &entries[e].0;
            let (theirs, their_key, _) = &entries[other].0;
            let shown = |b: &[u8]| {
                Path::new(std::ffi::OsStr::from_bytes(b))
                    .display()
                    .to_string()
            };
            let mut issue = Issue::at(
                sink.path(key),
                format!(
                    "delivery path `{}` of agent `{owner}`: its directory `{}` is given to agent `{owner}` (it has a `uid`), and agent `{}`'s delivery path `{}` is in it too, where `{owner}` could replace that file with its own. Give each agent a directory of its own (e.g. one named after it right below the delivery root)",
                    shown(place(e)),
                    shown(dir),
                    theirs.cred.agent,
                    shown(place(other)),
                ),
            );
            issue.related = Some(theirs.path(their_key));
            issues.push(issue);
        }
        issues
    }
}

/// A credential by name: enough to rebuild its TOML path for a duplicate's
/// message.
#[derive(Clone, Copy)]
pub(super) struct CredRef<'r> {
    pub(super) agent: &'r str,
    pub(super) cred: &'r str,
}

impl CredRef<'_> {
    pub(super) fn path(&self) -> TomlPath {
        TomlPath::root()
            .key("agents")
            .key(self.agent)
            .key("credentials")
            .key(self.cred)
    }
}

/// One vault path in use.
pub(super) struct VaultPathSeen<'r> {
    pub(super) vault: &'r str,
    pub(super) cred: CredRef<'r>,
    /// `path = ...` as written; `None` for the default `agents/AGENT/CRED`.
    pub(super) written: Option<&'r str>,
}

impl VaultPathSeen<'_> {
    /// The vault path in pieces, so that the default one needs no `format!`
    /// to be hashed and compared.
    pub(super) fn path_parts(&self) -> Parts<'_> {
        match self.written {
            Some(w) => Parts([w, "", "", ""]),
            None => Parts(["agents/", self.cred.agent, "/", self.cred.cred]),
        }
    }

    pub(super) fn hash(&self) -> u64 {
        let h = fnv1a(FNV_OFFSET, self.vault.as_bytes());
        // 0xff never occurs in UTF-8: the vault name cannot run into the path.
        let h = fnv1a(h, &[0xff]);
        self.path_parts()
            .0
            .iter()
            .fold(h, |h, part| fnv1a(h, part.as_bytes()))
    }

    /// Where the issue points: the `path` key, or the credential's table
    /// when the path is the default.
    pub(super) fn path(&self) -> TomlPath {
        let p = self.cred.path();
        if self.written.is_some() {
            p.key("path")
        } else {
            p
        }
    }
}

/// A string in up to four pieces.
pub(super) struct Parts<'a>(pub(super) [&'a str; 4]);

impl Parts<'_> {
    /// Whether the two concatenations are equal.
    pub(super) fn concat_eq(&self, other: &Parts<'_>) -> bool {
        let len = |p: &Parts<'_>| p.0.iter().map(|s| s.len()).sum::<usize>();
        len(self) == len(other)
            && self
                .0
                .iter()
                .flat_map(|s| s.bytes())
                .eq(other.0.iter().flat_map(|s| s.bytes()))
    }
}

/// A sink: `agents.AGENT.credentials.CRED.deliver[INDEX]`.
#[derive(Clone, Copy)]
pub(super) struct SinkRef<'r> {
    pub(super) cred: CredRef<'r>,
    pub(super) index: usize,
}

impl SinkRef<'_> {
    /// The path of its `key`.
    pub(super) fn path(&self, key: &str) -> TomlPath {
        self.cred.path().key("deliver").index(self.index).key(key)
    }
}

/// The first place each value was seen, for duplicate checks, keeping only
/// a small borrowed record per value (not the value itself). Values are
/// found by a hash the caller computes; records with the same hash are
/// chained and compared with the caller's `same`.
pub(super) struct FirstSeen<T> {
    /// Hash → index in `entries` of the latest record with that hash.
    pub(super) heads: HashMap<u64, usize>,
    /// Each record, with the index of the previous one of the same hash.
    pub(super) entries: Vec<(T, Option<usize>)>,
}

impl<T> Default for FirstSeen<T> {
    fn default() -> Self {
        Self {
            heads: HashMap::new(),
            entries: Vec::new(),
        }
    }
}

impl<T> FirstSeen<T> {
    /// A record with `hash` for which `is` holds (the latest, if several).
    pub(super) fn find(&self, hash: u64, is: impl Fn(&T) -> bool) -> Option<&T> {
        let mut at = self.heads.get(&hash).copied();
        while let Some(i) = at {
            let (record, prev) = &self.entries[i];
            if is(record) {
                return Some(record);
            }
            at = *prev;
        }
        None
    }

    /// The earlier record equal to `new` (by `same(earlier, new)`), or
    /// `None` after recording `new`.
    pub(super) fn first_or_insert(
        &mut self,
        hash: u64,
        new: T,
        same: impl Fn(&T, &T) -> bool,
    ) -> Option<&T> {
        let head = self.heads.get(&hash).copied();
        let mut at = head;
        while let Some(i) = at {
            let (earlier, prev) = &self.entries[i];
            if same(earlier, &new) {
                return Some(&self.entries[i].0);
            }
            at = *prev;
        }
        let index = self.entries.len();
        self.entries.push((new, head));
        self.heads.insert(hash, index);
        None
    }
}

pub(super) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, continued from `h`: streamed over pieces, it hashes their
/// concatenation (which `std`'s `Hasher::write` does not promise).
pub(super) fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}
