//! Where an issue is: TOML paths, built only when an issue is reported.

use std::fmt;
use std::ops::Range;

/// One step of a TOML path. Keys are shared (`Arc<str>`) so that cloning a
/// parent path does not copy its strings. Validation itself works with
/// borrowed [`Loc`]s and builds a `TomlPath` only for an issue.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Seg {
    Key(std::sync::Arc<str>),
    Index(usize),
}

/// A dotted TOML path such as `agents.invoice-bot.credentials.db.deliver[0].path`.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct TomlPath(pub Vec<Seg>);

impl TomlPath {
    pub fn root() -> Self {
        Self::default()
    }
    pub fn key(&self, k: impl Into<String>) -> Self {
        let mut p = Vec::with_capacity(self.0.len() + 1);
        p.extend(self.0.iter().cloned());
        p.push(Seg::Key(k.into().into()));
        TomlPath(p)
    }
    pub fn index(&self, i: usize) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }
    pub fn segments(&self) -> &[Seg] {
        &self.0
    }
}

impl fmt::Display for TomlPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !k.is_empty()
                        && k.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                    if bare {
                        f.write_str(k)?;
                    } else {
                        write!(f, "{k:?}")?;
                    }
                }
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Where validation is in the document, as a chain of borrowed segments on
/// the stack: `p.key("every")` is a pointer and a `&str`, no allocation. A
/// [`TomlPath`] is built from it only when an issue is reported. Building one
/// eagerly for every field checked was most of validation's time at 100k
/// credentials, for paths that a valid file never needs.
#[derive(Debug, Clone, Copy)]
pub struct Loc<'a> {
    parent: Option<&'a Loc<'a>>,
    seg: LocSeg<'a>,
}

#[derive(Debug, Clone, Copy)]
enum LocSeg<'a> {
    Key(&'a str),
    Index(usize),
}

impl<'a> Loc<'a> {
    /// A top-level key, e.g. `daemon` or `agents`.
    pub(crate) fn top(k: &'a str) -> Self {
        Loc {
            parent: None,
            seg: LocSeg::Key(k),
        }
    }

    pub(crate) fn key<'b>(&'b self, k: &'b str) -> Loc<'b> {
        Loc {
            parent: Some(self),
            seg: LocSeg::Key(k),
        }
    }

    pub(crate) fn index(&self, i: usize) -> Loc<'_> {
        Loc {
            parent: Some(self),
            seg: LocSeg::Index(i),
        }
    }

    /// The owned path, for an [`Issue`].
    pub(crate) fn path(&self) -> TomlPath {
        let mut segs = Vec::with_capacity(self.depth());
        let mut at = Some(self);
        while let Some(l) = at {
            segs.push(match l.seg {
                LocSeg::Key(k) => Seg::Key(k.into()),
                LocSeg::Index(i) => Seg::Index(i),
            });
            at = l.parent;
        }
        segs.reverse();
        TomlPath(segs)
    }

    fn depth(&self) -> usize {
        std::iter::successors(Some(self), |l| l.parent).count()
    }
}

/// Which part of a `key = value` pair an issue points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// The key (unknown keys, bad names, a missing key inside a table).
    Key,
    /// The value (a bad duration, an unknown reference, ...).
    Value,
}

/// One problem, located by TOML path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub path: TomlPath,
    pub anchor: Anchor,
    pub message: String,
    /// Another place involved (the first definition of a duplicate).
    pub related: Option<TomlPath>,
    /// A byte range in the source, when the reporter knows one better than
    /// the path does (deserialization errors); validation leaves it `None`.
    pub span: Option<Range<usize>>,
}

impl Issue {
    pub fn at(path: TomlPath, message: impl Into<String>) -> Self {
        Self {
            path,
            anchor: Anchor::Value,
            message: message.into(),
            related: None,
            span: None,
        }
    }
    pub fn at_key(path: TomlPath, message: impl Into<String>) -> Self {
        Self {
            anchor: Anchor::Key,
            ..Self::at(path, message)
        }
    }
}
