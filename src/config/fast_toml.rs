//! A small, strict TOML-subset parser with a serde `Deserializer`: the
//! first tier of the config fast path.
//!
//! Why it exists: at 100,000 credentials the config is ~21 MB, and
//! `toml::from_str` spends most of a second and ~800 MB of heap on it (a
//! token vector, a span-keeping document, then serde). Start-up must reach
//! READY in 2 s. This parser builds one arena of 32-byte nodes, borrows every
//! unescaped string from the text, and hands them straight to serde.
//!
//! The contract is soundness, not completeness: whenever [`from_str`]
//! returns `Ok(v)`, `toml::from_str` would return `Ok` with the same value.
//! Anything outside the subset, or anything doubtful, is an `Err`, and the
//! caller falls back to the `toml` crate (and from there to the located
//! path that reports errors). The subset is what keyturn configs use:
//! comments, `[dotted.headers]`, `key = value` with bare or quoted keys
//! (no dotted keys), single-line basic strings with TOML 1.0 escapes,
//! literal strings, decimal integers, floats, booleans, arrays (may span
//! lines) and single-line inline tables. Not supported (always `Err`):
//! multi-line strings, dates and times, hex/octal/binary integers, inf/nan,
//! arrays of tables, dotted keys, a byte-order mark.
//!
//! TOML's structural rules are enforced: no key or table defined twice, no
//! header naming a value, an array or an inline table (inline tables are
//! closed), and a table created implicitly by a deeper header may be defined
//! by its own header once.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use serde::de::value::{BorrowedStrDeserializer, StrDeserializer};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::forward_to_deserialize_any;

/// Why the fast parser declined a text: a syntax error, something outside
/// the subset, or a serde error from the target type. The message is for
/// debugging only; users see the located path's errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

/// Parses `text` (the subset above) and deserializes it into `T`.
pub fn from_str<'de, T: de::Deserialize<'de>>(text: &'de str) -> Result<T, Error> {
    let doc = Parser::new(text)?.parse()?;
    T::deserialize(NodeDe {
        doc: &doc,
        node: ROOT,
    })
}

const NONE: u32 = u32::MAX;
const ROOT: u32 = 0;
/// Tables with more children than this get a hash index: `agents` (1,000
/// children at 100k credentials) and each `credentials` table (100) would
/// otherwise be scanned once per header.
const INDEX_AFTER: usize = 16;
/// Nesting of arrays and inline tables; deeper is refused rather than
/// risking the stack on hostile input (`toml` itself stops at 80).
const MAX_DEPTH: usize = 64;
/// Segments of a header: `toml` refuses 80 or more, so we stop well before.
const MAX_SEGMENTS: usize = 32;

/// A string: a slice of the text, or (`start == NONE`) entry `len` of the
/// owned strings (only strings with escapes are owned).
#[derive(Clone, Copy)]
struct Str {
    start: u32,
    len: u32,
}

impl Str {
    const EMPTY: Str = Str { start: 0, len: 0 };
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Created as an intermediate of a deeper header: may still get its own header once.
    Implicit,
    /// Defined by its header (or the root).
    Explicit,
    /// `{ ... }`: closed to headers.
    Inline,
}

#[derive(Clone, Copy)]
enum Val {
    Str(Str),
    Int(i64),
    Float(f64),
    Bool(bool),
    Array {
        first: u32,
    },
    Table {
        first: u32,
        last: u32,
        kind: Kind,
        indexed: bool,
    },
}

/// One value in the arena, with its key (empty for array elements) and its
/// next sibling: children of tables and arrays are linked lists, since a
/// table's children do not arrive contiguously (`[a]`, `[b]`, `[a.c]`).
#[derive(Clone, Copy)]
struct Node {
    key: Str,
    next: u32,
    val: Val,
}

struct Doc<'de> {
    text: &'de str,
    nodes: Vec<Node>,
    owned: Vec<String>,
}

impl<'de> Doc<'de> {
    fn str(&self, s: Str) -> &str {
        if s.start == NONE {
            &self.owned[s.len as usize]
        } else {
            &self.text[s.start as usize..(s.start + s.len) as usize]
        }
    }
}

struct Parser<'de> {
    doc: Doc<'de>,
    bytes: &'de [u8],
    pos: usize,
    /// (table, hash of key) → child, for tables with many children. A hash
    /// collision only sends a lookup back to the linear scan.
    index: HashMap<(u32, u64), u32>,
    hasher: RandomState,
    /// The segments of the header being read (reused).
    segments: Vec<Str>,
}

fn err<T>(msg: &str, pos: usize) -> Result<T, Error> {
    Err(Error(format!("{msg} (byte {pos})")))
}

impl<'de> Parser<'de> {
    fn new(text: &'de str) -> Result<Self, Error> {
        // Offsets are u32, and NONE is reserved.
        if text.len() >= NONE as usize {
            return err("file too large for the fast parser", 0);
        }
        // A few nodes per line is typical; reserving avoids regrowth copies.
        let mut nodes = Vec::with_capacity(text.len() / 16 + 1);
        nodes.push(Node {
            key: Str::EMPTY,
            next: NONE,
            val: Val::Table {
                first: NONE,
                last: NONE,
                kind: Kind::Explicit,
                indexed: false,
            },
        });
        Ok(Parser {
            doc: Doc {
                text,
                nodes,
                owned: Vec::new(),
            },
            bytes: text.as_bytes(),
            pos: 0,
            index: HashMap::new(),
            hasher: RandomState::new(),
            segments: Vec::new(),
        })
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn parse(mut self) -> Result<Doc<'de>, Error> {
        let mut current = ROOT;
        loop {
            self.skip_ws();
            match self.peek() {
                None => break,
                Some(b'\n' | b'\r' | b'#') => self.line_end()?,
                Some(b'[') => {
                    current = self.header()?;
                    self.line_end()?;
                }
                Some(_) => {
                    self.keyval(current, 0)?;
                    self.line_end()?;
                }
            }
        }
        Ok(self.doc)
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t') = self.peek() {
            self.pos += 1;
        }
    }

    /// Optional whitespace and comment, then a newline (LF or CRLF) or the end.
    fn line_end(&mut self) -> Result<(), Error> {
        self.skip_ws();
        if self.peek() == Some(b'#') {
            self.comment()?;
        }
        match self.peek() {
            None => Ok(()),
            Some(b'\n') => {
                self.pos += 1;
                Ok(())
            }
            Some(b'\r') if self.bytes.get(self.pos + 1) == Some(&b'\n') => {
                self.pos += 2;
                Ok(())
            }
            Some(_) => err("expected the end of the line", self.pos),
        }
    }

    /// From `#` up to (not including) the line's end.
    fn comment(&mut self) -> Result<(), Error> {
        self.pos += 1;
        self.pos += self.bytes[self.pos..]
            .iter()
            .position(|&b| !matches!(b, b'\t' | 0x20..=0x7e | 0x80..))
            .unwrap_or(self.bytes.len() - self.pos);
        while let Some(b) = self.peek() {
            match b {
                b'\n' => return Ok(()),
                b'\r' => {
                    return if self.bytes.get(self.pos + 1) == Some(&b'\n') {
                        Ok(())
                    } else {
                        err("bare carriage return", self.pos)
                    };
                }
                b'\t' | 0x20..=0x7e | 0x80.. => self.pos += 1,
                _ => return err("control character in a comment", self.pos),
            }
        }
        Ok(())
    }

    /// Whitespace, newlines and comments (between array elements).
    fn skip_ws_comments_newlines(&mut self) -> Result<(), Error> {
        loop {
            self.skip_ws();
            match self.peek() {
                Some(b'#') => self.comment()?,
                Some(b'\n') => self.pos += 1,
                Some(b'\r') if self.bytes.get(self.pos + 1) == Some(&b'\n') => self.pos += 2,
                _ => return Ok(()),
            }
        }
    }

    /// `[a.b."c"]`: returns the table it defines.
    fn header(&mut self) -> Result<u32, Error> {
        let start = self.pos;
        self.pos += 1;
        if self.peek() == Some(b'[') {
            return err("arrays of tables are not supported", start);
        }
        let mut segments = std::mem::take(&mut self.segments);
        segments.clear();
        loop {
            self.skip_ws();
            if segments.len() == MAX_SEGMENTS {
                return err("table header too deep", start);
            }
            segments.push(self.key()?);
            self.skip_ws();
            match self.peek() {
                Some(b'.') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    break;
                }
                _ => return err("expected `.` or `]` in a table header", self.pos),
            }
        }
        let mut table = ROOT;
        let n = segments.len();
        for (i, &seg) in segments.iter().enumerate() {
            let last = i + 1 == n;
            table = match self.find_child(table, seg) {
                None => {
                    let kind = if last { Kind::Explicit } else { Kind::Implicit };
                    let child = self.push(seg, Val::table(kind));
                    self.append_child(table, child);
                    child
                }
                Some(child) => match &mut self.doc.nodes[child as usize].val {
                    Val::Table { kind, .. } if *kind == Kind::Implicit => {
                        if last {
                            *kind = Kind::Explicit;
                        }
                        child
                    }
                    Val::Table { kind, .. } if *kind == Kind::Explicit && !last => child,
                    Val::Table { kind, .. } if *kind == Kind::Explicit => {
                        return err("table defined twice", start);
                    }
                    _ => return err("header names a value, an array or an inline table", start),
                },
            };
        }
        self.segments = segments;
        Ok(table)
    }

    /// `key = value` into `table` (the current header's, or an inline table).
    fn keyval(&mut self, table: u32, depth: usize) -> Result<(), Error> {
        let key = self.key()?;
        self.skip_ws();
        match self.peek() {
            Some(b'=') => self.pos += 1,
            Some(b'.') => return err("dotted keys are not supported", self.pos),
            _ => return err("expected `=`", self.pos),
        }
        self.skip_ws();
        if self.find_child(table, key).is_some() {
            return err("key defined twice", self.pos);
        }
        let child = self.value(key, depth)?;
        self.append_child(table, child);
        Ok(())
    }

    fn key(&mut self) -> Result<Str, Error> {
        let start = self.pos;
        let key = match self.peek() {
            Some(b'"') => self.basic_string()?,
            Some(b'\'') => self.literal_string()?,
            _ => {
                while let Some(b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-') = self.peek()
                {
                    self.pos += 1;
                }
                if self.pos == start {
                    return err("expected a key", start);
                }
                Str {
                    start: start as u32,
                    len: (self.pos - start) as u32,
                }
            }
        };
        // toml's own value types treat these keys as markers (datetimes,
        // spans): never guess how they would come out.
        if self.doc.str(key).starts_with("$__toml_private") {
            return err("reserved key", start);
        }
        Ok(key)
    }

    /// Parses a value at `pos` into a new node keyed `key`.
    fn value(&mut self, key: Str, depth: usize) -> Result<u32, Error> {
        if depth >= MAX_DEPTH {
            return err("nested too deeply", self.pos);
        }
        let val = match self.peek() {
            Some(b'"') => Val::Str(self.basic_string()?),
            Some(b'\'') => Val::Str(self.literal_string()?),
            Some(b'[') => return self.array(key, depth + 1),
            Some(b'{') => return self.inline_table(key, depth + 1),
            Some(b'0'..=b'9' | b'+' | b'-' | b't' | b'f') => self.scalar()?,
            _ => return err("unsupported value", self.pos),
        };
        Ok(self.push(key, val))
    }

    fn array(&mut self, key: Str, depth: usize) -> Result<u32, Error> {
        self.pos += 1;
        let node = self.push(key, Val::Array { first: NONE });
        let mut last = NONE;
        loop {
            self.skip_ws_comments_newlines()?;
            if self.peek() == Some(b']') {
                self.pos += 1;
                break;
            }
            let child = self.value(Str::EMPTY, depth)?;
            if last == NONE {
                self.doc.nodes[node as usize].val = Val::Array { first: child };
            } else {
                self.doc.nodes[last as usize].next = child;
            }
            last = child;
            self.skip_ws_comments_newlines()?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    break;
                }
                _ => return err("expected `,` or `]` in an array", self.pos),
            }
        }
        Ok(node)
    }

    /// `{ k = v, ... }` on one line (arrays inside may still span lines, as
    /// TOML 1.0 allows); no trailing comma.
    fn inline_table(&mut self, key: Str, depth: usize) -> Result<u32, Error> {
        self.pos += 1;
        let node = self.push(key, Val::table(Kind::Inline));
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(node);
        }
        loop {
            self.skip_ws();
            self.keyval(node, depth)?;
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(node);
                }
                _ => return err("expected `,` or `}` in an inline table", self.pos),
            }
        }
    }

    /// A `"..."` string (the opening quote at `pos`).
    fn basic_string(&mut self) -> Result<Str, Error> {
        let open = self.pos;
        self.pos += 1;
        let start = self.pos;
        // The common case: no escapes, borrowed from the text.
        self.pos += self.bytes[start..]
            .iter()
            .position(|&b| !is_string_char(b))
            .unwrap_or(self.bytes.len() - start);
        match self.peek() {
            Some(b'"') => {}
            Some(b'\\') => return self.escaped_string(start),
            _ => return err("invalid character in a string", self.pos),
        }
        if self.pos == start && self.bytes.get(self.pos + 1) == Some(&b'"') {
            return err("multi-line strings are not supported", open);
        }
        self.pos += 1;
        Ok(Str {
            start: start as u32,
            len: (self.pos - 1 - start) as u32,
        })
    }

    /// The rest of a basic string from its first backslash; `start` is just
    /// after the opening quote.
    fn escaped_string(&mut self, start: usize) -> Result<Str, Error> {
        let text = self.doc.text;
        let mut s = String::with_capacity(self.pos - start + 16);
        let mut run = start;
        loop {
            match self.peek() {
                Some(b'"') => {
                    s.push_str(&text[run..self.pos]);
                    self.pos += 1;
                    break;
                }
                Some(b'\\') => {
                    s.push_str(&text[run..self.pos]);
                    let esc = self.pos;
                    self.pos += 2;
                    let c = match self.bytes.get(esc + 1) {
                        Some(b'b') => '\u{8}',
                        Some(b't') => '\t',
                        Some(b'n') => '\n',
                        Some(b'f') => '\u{c}',
                        Some(b'r') => '\r',
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'u') => self.hex_char(4)?,
                        Some(b'U') => self.hex_char(8)?,
                        _ => return err("invalid escape", esc),
                    };
                    s.push(c);
                    run = self.pos;
                }
                Some(b) if is_string_char(b) => self.pos += 1,
                _ => return err("invalid character in a string", self.pos),
            }
        }
        self.doc.owned.push(s);
        Ok(Str {
            start: NONE,
            len: (self.doc.owned.len() - 1) as u32,
        })
    }

    fn hex_char(&mut self, digits: usize) -> Result<char, Error> {
        let at = self.pos;
        let hex = self
            .bytes
            .get(at..at + digits)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .ok_or_else(|| Error(format!("invalid unicode escape (byte {at})")))?;
        // Only ASCII hex digits, checked above.
        let v = u32::from_str_radix(std::str::from_utf8(hex).unwrap_or("x"), 16)
            .map_err(|_| Error(format!("invalid unicode escape (byte {at})")))?;
        self.pos += digits;
        char::from_u32(v).ok_or_else(|| Error(format!("not a unicode scalar value (byte {at})")))
    }

    /// A `'...'` string (the opening quote at `pos`).
    fn literal_string(&mut self) -> Result<Str, Error> {
        let open = self.pos;
        self.pos += 1;
        let start = self.pos;
        self.pos += self.bytes[start..]
            .iter()
            .position(|&b| !matches!(b, b'\t' | 0x20..=0x26 | 0x28..=0x7e | 0x80..))
            .unwrap_or(self.bytes.len() - start);
        if self.peek() != Some(b'\'') {
            return err("invalid character in a literal string", self.pos);
        }
        if self.pos == start && self.bytes.get(self.pos + 1) == Some(&b'\'') {
            return err("multi-line strings are not supported", open);
        }
        self.pos += 1;
        Ok(Str {
            start: start as u32,
            len: (self.pos - 1 - start) as u32,
        })
    }

    /// A boolean, integer or float. The token is taken greedily over every
    /// byte that could continue one (dates and times too, so that
    /// `1979-05-27` is refused whole instead of read as `1979`).
    fn scalar(&mut self) -> Result<Val, Error> {
        let start = self.pos;
        while let Some(b'0'..=b'9' | b'A'..=b'Z' | b'a'..=b'z' | b'_' | b'+' | b'-' | b'.' | b':') =
            self.peek()
        {
            self.pos += 1;
        }
        let token = &self.doc.text[start..self.pos];
        match token {
            "true" => return Ok(Val::Bool(true)),
            "false" => return Ok(Val::Bool(false)),
            _ => {}
        }
        match number_kind(token.as_bytes()) {
            Some(false) => match without_underscores(token).parse::<i64>() {
                Ok(i) => Ok(Val::Int(i)),
                Err(_) => err("integer out of range", start),
            },
            Some(true) => match without_underscores(token).parse::<f64>() {
                Ok(f) if f.is_finite() => Ok(Val::Float(f)),
                _ => err("float out of range", start),
            },
            None => err("unsupported value", start),
        }
    }

    fn push(&mut self, key: Str, val: Val) -> u32 {
        self.doc.nodes.push(Node {
            key,
            next: NONE,
            val,
        });
        (self.doc.nodes.len() - 1) as u32
    }

    fn hash(&self, key: Str) -> u64 {
        self.hasher.hash_one(self.doc.str(key))
    }

    fn find_child(&mut self, table: u32, key: Str) -> Option<u32> {
        let Val::Table { first, indexed, .. } = self.doc.nodes[table as usize].val else {
            return None;
        };
        let wanted = self.doc.str(key).as_bytes();
        if indexed
            && let Some(&n) = self.index.get(&(table, self.hash(key)))
            && self.doc.str(self.doc.nodes[n as usize].key).as_bytes() == wanted
        {
            return Some(n);
        }
        let mut count = 0;
        let mut cur = first;
        while cur != NONE {
            let node = &self.doc.nodes[cur as usize];
            // Most keys differ in length or first byte: decide those
            // without a call to memcmp.
            let k = node.key;
            let maybe = k.start == NONE
                || (k.len as usize == wanted.len()
                    && self.bytes.get(k.start as usize) == wanted.first());
            if maybe && self.doc.str(k).as_bytes() == wanted {
                return Some(cur);
            }
            count += 1;
            cur = node.next;
        }
        if !indexed && count > INDEX_AFTER {
            self.build_index(table);
        }
        None
    }

    fn build_index(&mut self, table: u32) {
        let Val::Table { first, indexed, .. } = &mut self.doc.nodes[table as usize].val else {
            return;
        };
        *indexed = true;
        let mut cur = *first;
        while cur != NONE {
            let h = self.hash(self.doc.nodes[cur as usize].key);
            // Keep the first of two colliding keys; the other is found by the scan.
            self.index.entry((table, h)).or_insert(cur);
            cur = self.doc.nodes[cur as usize].next;
        }
    }

    fn append_child(&mut self, table: u32, child: u32) {
        let Val::Table {
            first,
            last,
            indexed,
            ..
        } = &mut self.doc.nodes[table as usize].val
        else {
            return;
        };
        let prev = *last;
        *last = child;
        if prev == NONE {
            *first = child;
        }
        let indexed = *indexed;
        if prev != NONE {
            self.doc.nodes[prev as usize].next = child;
        }
        if indexed {
            let h = self.hash(self.doc.nodes[child as usize].key);
            self.index.entry((table, h)).or_insert(child);
        }
    }
}

impl Val {
    fn table(kind: Kind) -> Val {
        Val::Table {
            first: NONE,
            last: NONE,
            kind,
            indexed: false,
        }
    }
}

/// A byte allowed unescaped in a basic string (besides the quote and the
/// backslash, which the caller handles): no control character but tab.
fn is_string_char(b: u8) -> bool {
    matches!(b, b'\t' | 0x20..=0x7e | 0x80..) && b != b'"' && b != b'\\'
}

fn without_underscores(token: &str) -> std::borrow::Cow<'_, str> {
    if token.contains('_') {
        token.replace('_', "").into()
    } else {
        token.into()
    }
}

/// Checks a number token against TOML 1.0's decimal integer and float
/// grammar: `Some(false)` for an integer, `Some(true)` for a float, `None`
/// for anything else (hex, octal, binary, inf, nan, dates, junk).
fn number_kind(t: &[u8]) -> Option<bool> {
    let mut i = 0;
    if let Some(b'+' | b'-') = t.first() {
        i = 1;
    }
    // Integer part: no leading zero unless it is the only digit.
    if t.get(i) == Some(&b'0') {
        i += 1;
        if let Some(b'0'..=b'9' | b'_') = t.get(i) {
            return None;
        }
    } else {
        i = digits(t, i)?;
    }
    let mut float = false;
    if t.get(i) == Some(&b'.') {
        i = digits(t, i + 1)?;
        float = true;
    }
    if let Some(b'e' | b'E') = t.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = t.get(i) {
            i += 1;
        }
        i = digits(t, i)?;
        float = true;
    }
    (i == t.len()).then_some(float)
}

/// One or more digits with `_` only between two digits, from `i`; returns
/// the end.
fn digits(t: &[u8], mut i: usize) -> Option<usize> {
    if !t.get(i)?.is_ascii_digit() {
        return None;
    }
    i += 1;
    loop {
        match t.get(i) {
            Some(b'0'..=b'9') => i += 1,
            Some(b'_') if t.get(i + 1).is_some_and(u8::is_ascii_digit) => i += 2,
            _ => return Some(i),
        }
    }
}

/// Deserializes one node.
struct NodeDe<'a, 'de> {
    doc: &'a Doc<'de>,
    node: u32,
}

impl<'de> Deserializer<'de> for NodeDe<'_, 'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let doc = self.doc;
        match doc.nodes[self.node as usize].val {
            Val::Str(s) if s.start == NONE => visitor.visit_str(&doc.owned[s.len as usize]),
            Val::Str(s) => {
                visitor.visit_borrowed_str(&doc.text[s.start as usize..(s.start + s.len) as usize])
            }
            Val::Int(i) => visitor.visit_i64(i),
            Val::Float(f) => visitor.visit_f64(f),
            Val::Bool(b) => visitor.visit_bool(b),
            Val::Array { first } => {
                let mut seq = Children { doc, cur: first };
                let v = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(v)
            }
            Val::Table { first, .. } => {
                let mut map = Children { doc, cur: first };
                let v = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(v)
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    /// Only unit variants, written as strings (`encoding = "hex"`).
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let doc = self.doc;
        match doc.nodes[self.node as usize].val {
            Val::Str(s) if s.start == NONE => {
                StrDeserializer::<Error>::new(&doc.owned[s.len as usize])
                    .deserialize_enum(name, variants, visitor)
            }
            Val::Str(s) => BorrowedStrDeserializer::<Error>::new(
                &doc.text[s.start as usize..(s.start + s.len) as usize],
            )
            .deserialize_enum(name, variants, visitor),
            _ => Err(Error(format!("{name}: only string variants are supported"))),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct identifier
    }
}

/// The children of a table (as a map) or an array (as a sequence).
struct Children<'a, 'de> {
    doc: &'a Doc<'de>,
    cur: u32,
}

impl Children<'_, '_> {
    /// A visitor that stopped early: refused, since it is not certain the
    /// `toml` crate would accept the same.
    fn end(&self) -> Result<(), Error> {
        if self.cur == NONE {
            Ok(())
        } else {
            Err(Error("trailing entries left unread".into()))
        }
    }
}

impl<'de> SeqAccess<'de> for &mut Children<'_, 'de> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        if self.cur == NONE {
            return Ok(None);
        }
        let node = self.cur;
        self.cur = self.doc.nodes[node as usize].next;
        seed.deserialize(NodeDe {
            doc: self.doc,
            node,
        })
        .map(Some)
    }
}

impl<'de> MapAccess<'de> for &mut Children<'_, 'de> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        if self.cur == NONE {
            return Ok(None);
        }
        let doc = self.doc;
        let key = doc.nodes[self.cur as usize].key;
        if key.start == NONE {
            seed.deserialize(StrDeserializer::<Error>::new(&doc.owned[key.len as usize]))
                .map(Some)
        } else {
            seed.deserialize(BorrowedStrDeserializer::<Error>::new(
                &doc.text[key.start as usize..(key.start + key.len) as usize],
            ))
            .map(Some)
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        if self.cur == NONE {
            return Err(Error("value requested without a key".into()));
        }
        let node = self.cur;
        self.cur = self.doc.nodes[node as usize].next;
        seed.deserialize(NodeDe {
            doc: self.doc,
            node,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::super::load::File;
    use super::*;

    /// The soundness property on `text`, for a generic table and for the
    /// config's own shape: when the fast parser accepts, `toml` accepts
    /// with the same value. Returns whether the fast parser accepted.
    fn sound(text: &str) -> bool {
        let fast = from_str::<toml::Table>(text);
        if let Ok(fast) = &fast {
            match toml::from_str::<toml::Table>(text) {
                Ok(slow) => assert_eq!(fast, &slow, "values differ for {text:?}"),
                Err(e) => panic!("fast accepted what toml refuses ({e}): {text:?}"),
            }
        }
        if let Ok(fast) = from_str::<File>(text) {
            match toml::from_str::<File>(text) {
                Ok(slow) => assert_eq!(fast, slow, "File values differ for {text:?}"),
                Err(e) => panic!("fast accepted a File toml refuses ({e}): {text:?}"),
            }
        }
        fast.is_ok()
    }

    #[track_caller]
    fn accepts(text: &str) -> toml::Table {
        assert!(
            sound(text),
            "fast parser refused {text:?}: {:?}",
            from_str::<toml::Table>(text)
        );
        from_str(text).unwrap()
    }

    #[track_caller]
    fn rejects(text: &str) {
        assert!(
            from_str::<toml::Table>(text).is_err(),
            "fast parser accepted {text:?}"
        );
    }

    /// Invalid TOML: both parsers refuse it.
    #[track_caller]
    fn invalid(text: &str) {
        rejects(text);
        assert!(
            toml::from_str::<toml::Table>(text).is_err(),
            "toml accepted {text:?}"
        );
    }

    fn toml_files() -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "toml") {
                    out.push(p);
                }
            }
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        walk(&root.join("config"), &mut files);
        walk(&root.join("tests/fixtures"), &mut files);
        files.sort();
        files
    }

    fn is_good(p: &Path) -> bool {
        !p.file_name().unwrap().to_string_lossy().starts_with("bad-")
    }

    #[test]
    fn every_config_and_fixture_is_read_like_toml_reads_it() {
        let files = toml_files();
        assert!(files.len() > 20, "{files:?}");
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            let accepted = sound(&text);
            if is_good(f) {
                // The subset must cover every shipped config: otherwise
                // the fast tier silently stops being the fast one.
                assert!(
                    accepted,
                    "{}: {:?}",
                    f.display(),
                    from_str::<toml::Table>(&text)
                );
                if let Err(e) = from_str::<File>(&text) {
                    panic!("{}: {e}", f.display());
                }
            }
        }
    }

    #[test]
    fn structural_rules_are_enforced() {
        invalid("a = 1\na = 2\n");
        invalid("a = 1\n'a' = 2\n");
        invalid("a = 1\n\"\\u0061\" = 2\n");
        invalid("[a]\n[a]\n");
        invalid("[a]\n[\"a\"]\n");
        invalid("a = 1\n[a]\n");
        invalid("a = 1\n[a.b]\n");
        invalid("a = {}\n[a]\n");
        invalid("a = { b = 1 }\n[a.c]\n");
        invalid("a = { b = {} }\n[a.b]\n");
        invalid("[a]\nb = { c = 1 }\n[a.b.d]\n");
        invalid("a = [1]\n[a]\n");
        invalid("a = [{}]\n[a.b]\n");
        invalid("x = { a = 1, a = 2 }\n");
        invalid("[a.b]\n[a]\nb = 1\n");
        invalid("[a.b.c]\n[a]\n[a]\n");
        invalid("[a.b.c]\n[a.b]\n[a.b]\n");
        invalid(&format!("[{}]\n", vec!["a"; 100].join(".")));
        rejects(&format!("[{}]\n", vec!["a"; 40].join(".")));
        rejects(&format!("a = {}1{}\n", "[".repeat(70), "]".repeat(70)));
        invalid(&format!("a = {}1{}\n", "[".repeat(100), "]".repeat(100)));
        invalid("[]\n");
        invalid("[a.]\n");
        invalid("[.a]\n");
        invalid("[a..b]\n");
        invalid("[a\n");
        invalid("[a] b = 1\n");
        invalid("= 1\n");
        invalid("a =\n");
        invalid("a = 1 2\n");
        invalid("a = \"x\" b\n");
        invalid("a = truex\n");
        // A table an earlier header created implicitly may be defined once.
        let t = accepts("[a.b.c]\nx = 1\n[a]\ny = 2\n[a.b.d]\n");
        assert_eq!(t["a"]["y"].as_integer(), Some(2));
        assert_eq!(t["a"]["b"]["c"]["x"].as_integer(), Some(1));
        accepts("[a.b]\n[a.b.c]\n[a.d]\n[ a . \"b\" . 'e' ]\n");
        accepts("x = {}\ny = { a = 1, b = { c = [1, { d = 'e' }] } }\n");
        // Outside the subset, though valid TOML: declined, never misread.
        rejects("a.b = 1\n");
        rejects("[a]\nb . c = 1\n");
        rejects("x = { a.b = 1 }\n");
        rejects("[[a]]\nb = 1\n");
        rejects("a = 0x10\n");
        rejects("a = 0o7\n");
        rejects("a = 0b1\n");
        rejects("a = 1979-05-27\n");
        rejects("a = 1979-05-27T07:32:00Z\n");
        rejects("a = 1979-05-27 07:32:00\n");
        rejects("a = 07:32:00\n");
        rejects("a = \"\"\"x\"\"\"\n");
        rejects("a = '''x'''\n");
        rejects("a = inf\n");
        rejects("a = nan\n");
        rejects("a = -inf\n");
        rejects("\u{feff}a = 1\n");
        rejects("\"$__toml_private_datetime\" = \"1979-05-27\"\n");
    }

    /// Big tables are indexed: lookups and duplicate checks must still be
    /// exact there, for keys and for headers.
    #[test]
    fn big_tables_find_duplicates_too() {
        let mut keys = String::from("[t]\n");
        let mut headers = String::new();
        for i in 0..40 {
            keys.push_str(&format!("k{i} = {i}\n"));
            headers.push_str(&format!("[big.x{i}]\nv = {i}\n"));
        }
        assert_eq!(accepts(&keys)["t"].as_table().unwrap().len(), 40);
        invalid(&format!("{keys}k7 = 1\n"));
        invalid(&format!("{keys}'k39' = 1\n"));
        let t = accepts(&format!("{headers}[big]\nw = 1\n[big.x40]\n"));
        assert_eq!(t["big"].as_table().unwrap().len(), 42);
        assert_eq!(t["big"]["x33"]["v"].as_integer(), Some(33));
        invalid(&format!("{headers}[big.x5]\n"));
        invalid(&format!("{headers}[big.\"x39\"]\n"));
        invalid(&format!("{headers}[big]\nx12 = 1\n"));
        invalid(&format!("{headers}[big]\n[big]\n"));
    }

    #[test]
    fn strings_and_escapes() {
        let t = accepts(
            "s = \"a\\b\\t\\n\\f\\r\\\"\\\\\\u00e9\\U0001F600z\"\nl = 'C:\\x\\\"'\ne = \"\"\nf = ''\n\
             u = \"h\u{e9}llo \u{1F600}\ttab\"\n",
        );
        assert_eq!(
            t["s"].as_str(),
            Some("a\u{8}\t\n\u{c}\r\"\\\u{e9}\u{1F600}z")
        );
        assert_eq!(t["l"].as_str(), Some("C:\\x\\\""));
        assert_eq!(t["e"].as_str(), Some(""));
        assert_eq!(t["f"].as_str(), Some(""));
        assert_eq!(t["u"].as_str(), Some("h\u{e9}llo \u{1F600}\ttab"));
        invalid("s = \"\\q\"\n");
        invalid("s = \"\\uD800\"\n");
        invalid("s = \"\\u12\"\n");
        invalid("s = \"\\U00110000\"\n");
        invalid("s = \"\\\"\n");
        invalid("s = \"abc\n");
        invalid("s = 'abc\n");
        invalid("s = 'it's'\n");
        // TOML 1.1 escapes (toml 0.9 reads them): outside the subset.
        rejects("s = \"\\e\"\n");
        rejects("s = \"\\x41\"\n");
        // Control characters other than tab, in every place they can appear.
        invalid("s = \"x\u{1}y\"\n");
        invalid("s = \"x\u{7f}\"\n");
        invalid("s = 'x\u{1}'\n");
        invalid("s = \"x\ry\"\n");
        invalid("s = 1 # x\u{0}\n");
        rejects("s = 1 # x\u{7f}\n");
        invalid("\"a\u{1}\" = 1\n");
    }

    #[test]
    fn keys_may_be_quoted_and_hold_dots() {
        let t = accepts(
            "\"a.b\" = 1\n'c d' = 2\n\"\" = 3\n[x.\"y.z\"]\n['a b'.c-d_0]\nq = \"\\u0041\"\n",
        );
        assert_eq!(t["a.b"].as_integer(), Some(1));
        assert_eq!(t["c d"].as_integer(), Some(2));
        assert_eq!(t[""].as_integer(), Some(3));
        assert!(t["x"]["y.z"].is_table());
        assert_eq!(t["a b"]["c-d_0"]["q"].as_str(), Some("A"));
        // An escaped key is the same key as its plain spelling.
        let t = accepts("[t]\n\"\\u0041\" = 1\nb = 2\n");
        assert_eq!(t["t"]["A"].as_integer(), Some(1));
    }

    #[test]
    fn line_ends_comments_and_arrays() {
        let t = accepts(
            "# head\r\na = 1\r\n[b] # c\r\nc = \"x\" # c\r\n\r\nd = [\r\n  1, # one\r\n  2,\r\n]\r\n",
        );
        assert_eq!(t["b"]["d"].as_array().unwrap().len(), 2);
        let t = accepts(
            "a = [ # c\n 1, # d\n\n 2 # e\n , 3, # f\n]\nb = [\n]\nc = []\nd = [[1, 2], ['x', { y = true }], 1.5]\n",
        );
        assert_eq!(t["a"].as_array().unwrap().len(), 3);
        assert_eq!(t["b"].as_array().unwrap().len(), 0);
        assert_eq!(t["d"].as_array().unwrap().len(), 3);
        accepts("a = 1");
        accepts("");
        accepts("\n\n  # only comments\n\t\n");
        invalid("a = 1\rb = 2\n");
        invalid("# c\r");
        invalid("a = [,]\n");
        invalid("a = [1,,2]\n");
        invalid("a = [1 2]\n");
        invalid("a = [1,\n");
        // Inline tables: one line, no trailing comma, no comment (TOML 1.1
        // allows these and toml 0.9 reads some of them: outside the subset).
        rejects("a = { b = 1, }\n");
        rejects("a = { b = 1\n}\n");
        rejects("a = {\nb = 1 }\n");
        rejects("a = { b = 1 # c\n}\n");
        invalid("a = { b = 1 c = 2 }\n");
        invalid("a = { , }\n");
        // Arrays inside an inline table may still span lines (TOML 1.0);
        // whatever the fast parser does with it must match toml.
        sound("a = { b = [\n1,\n2,\n], c = 3 }\n");
    }

    #[test]
    fn integers_and_floats() {
        let t = accepts(&format!(
            "a = {}\nb = {}\nc = -0\nd = +1\ne = 1_000\nf = +0\ng = 0\n",
            i64::MAX,
            i64::MIN
        ));
        assert_eq!(t["a"].as_integer(), Some(i64::MAX));
        assert_eq!(t["b"].as_integer(), Some(i64::MIN));
        assert_eq!(t["c"].as_integer(), Some(0));
        assert_eq!(t["d"].as_integer(), Some(1));
        assert_eq!(t["e"].as_integer(), Some(1000));
        invalid("a = 9223372036854775808\n");
        invalid("a = -9223372036854775809\n");
        invalid("a = 1__0\n");
        invalid("a = 01\n");
        invalid("a = 00\n");
        invalid("a = 0_0\n");
        invalid("a = _1\n");
        invalid("a = 1_\n");
        invalid("a = +-1\n");
        invalid("a = --1\n");
        invalid("a = +\n");
        let t = accepts(
            "a = 1e3\nb = 1.5\nc = -1.5e-3\nd = 1_0.5_0\ne = 1E+3\nf = 0.0\ng = -0.0\nh = 3.0e0_1\n",
        );
        assert_eq!(t["a"].as_float(), Some(1e3));
        assert_eq!(t["b"].as_float(), Some(1.5));
        assert_eq!(t["c"].as_float(), Some(-1.5e-3));
        assert_eq!(t["d"].as_float(), Some(10.5));
        assert_eq!(t["e"].as_float(), Some(1e3));
        assert_eq!(t["h"].as_float(), Some(3e1));
        invalid("a = .5\n");
        invalid("a = 5.\n");
        invalid("a = 1.e3\n");
        invalid("a = 1e\n");
        invalid("a = 01.5\n");
        invalid("a = 1.5_\n");
        invalid("a = 1._5\n");
        invalid("a = 1e_3\n");
        rejects("a = 1e400\n");
    }

    /// Values come out as the config types need them: internally tagged
    /// enums, unit enums from strings, options, floats from integers.
    #[test]
    fn deserializes_into_the_config_shape() {
        let text = "[vaults.aws]\ntype = \"aws_secrets_manager\"\nwrite_budget = 25\n\
                    [agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\nuid = 7\n\
                    [agents.a.credentials.c]\nvault = [\"aws\", \"b\\u0061o\"]\n\
                    generate = { kind = \"random_bytes\", length = 48, encoding = \"base64url\" }\n\
                    deliver = [{ type = \"file\", path = \"a/c\", format = \"json\" }]\n\
                    target = { type = \"command\", program = \"/bin/x\", env = { K = \"v\" } }\n";
        let fast: File = from_str(text).unwrap();
        assert_eq!(fast, toml::from_str::<File>(text).unwrap());
        let dbg = format!("{fast:?}");
        for want in [
            "write_budget: Some(25.0)",
            "Base64Url",
            "Json",
            "[\"aws\", \"bao\"]",
            "uid: Some(7)",
        ] {
            assert!(dbg.contains(want), "{want} not in {dbg}");
        }
        // What serde refuses, the fast parser refuses too (and so does toml).
        for bad in [
            "[daemon]\nbogus = 1\n",
            "[vaults.v]\ntype = \"nope\"\n",
            "[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\nuid = -1\n",
            "[daemon]\nmax_concurrent_rotations = \"8\"\n",
        ] {
            assert!(from_str::<File>(bad).is_err(), "{bad}");
            assert!(toml::from_str::<File>(bad).is_err(), "{bad}");
        }
        let bad_enum = "[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"l\"\n\
                        [agents.a.credentials.c]\nvault = \"v\"\n\
                        generate = { kind = \"random_bytes\", encoding = \"base32\" }\n";
        assert!(from_str::<File>(bad_enum).is_err());
        assert!(toml::from_str::<File>(bad_enum).is_err());
    }

    /// Random edits of the good configs: whatever the fast parser accepts,
    /// toml accepts with the same value.
    #[test]
    fn mutated_configs_keep_the_soundness_property() {
        const PIECES: &[&str] = &[
            "[", "]", "\"", "'", "=", ",", ".", "\n", "#", "{", "}", "0", "a", "\\", " ", "\r",
            "-", "_", "e", "+", "\t", "\u{1}", "\"\"", "[[", "1_0", "true",
        ];
        let texts: Vec<String> = toml_files()
            .iter()
            .filter(|p| is_good(p))
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        // A longer hunt: KEYTURN_FUZZ_CASES=1000000 KEYTURN_FUZZ_SEED=n with --release.
        let env = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let mut rng = StdRng::seed_from_u64(env("KEYTURN_FUZZ_SEED", 0x006b_6579_7475_726e));
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..env("KEYTURN_FUZZ_CASES", 3000) {
            let mut text = texts[rng.gen_range(0..texts.len())].clone().into_bytes();
            for _ in 0..rng.gen_range(1..=3) {
                let at = rng.gen_range(0..=text.len());
                match rng.gen_range(0..6) {
                    0 if at < text.len() => {
                        text.remove(at);
                    }
                    1 | 2 => {
                        let piece = PIECES[rng.gen_range(0..PIECES.len())];
                        text.splice(at..at, piece.bytes());
                    }
                    3 if at < text.len() => {
                        let b = text[at];
                        text.insert(at, b);
                    }
                    4 => {
                        // Duplicate or delete the line holding `at`.
                        let start = text[..at]
                            .iter()
                            .rposition(|&b| b == b'\n')
                            .map_or(0, |i| i + 1);
                        let end = text[at..]
                            .iter()
                            .position(|&b| b == b'\n')
                            .map_or(text.len(), |i| at + i + 1);
                        if rng.gen_bool(0.5) {
                            let line = text[start..end].to_vec();
                            text.splice(end..end, line);
                        } else {
                            text.drain(start..end);
                        }
                    }
                    _ => {
                        // Move a line elsewhere (reorders headers and keys).
                        let start = text[..at]
                            .iter()
                            .rposition(|&b| b == b'\n')
                            .map_or(0, |i| i + 1);
                        let end = text[at..]
                            .iter()
                            .position(|&b| b == b'\n')
                            .map_or(text.len(), |i| at + i + 1);
                        let line: Vec<u8> = text.drain(start..end).collect();
                        let to = rng.gen_range(0..=text.len());
                        text.splice(to..to, line);
                    }
                }
            }
            let Ok(text) = String::from_utf8(text) else {
                continue;
            };
            if sound(&text) {
                accepted += 1;
            } else {
                refused += 1;
            }
        }
        // Both outcomes must be exercised for the loop to prove anything.
        assert!(
            accepted > 300 && refused > 300,
            "accepted {accepted}, refused {refused}"
        );
    }

    /// The benchmark's config (`bench/run.py::write_config`), n credentials.
    fn bench_config(n: usize) -> String {
        use std::fmt::Write;
        const PER_AGENT: usize = 100;
        let d = "/tmp/kt-bench";
        let mut s = format!(
            "[daemon]\nstate_dir = \"{d}/state\"\nsocket = \"{d}/control.sock\"\n\
             delivery_roots = [\"{d}/agents\"]\ndrain_timeout = \"30s\"\ncatch_up_spread = \"5m\"\n\
             max_concurrent_rotations = 64\n\
             retry = {{ initial_delay = \"500ms\", max_delay = \"10s\", max_attempts = 5 }}\n\n\
             [vaults.local]\ntype = \"local\"\nmax_concurrent = 64\n\n"
        );
        for a in 0..n.div_ceil(PER_AGENT) {
            let aid = format!("a{a:05}");
            let _ = write!(
                s,
                "[agents.{aid}]\nowner = \"bench@example.com\"\ntenant = \"bench\"\ntier = \"low\"\n\n"
            );
            for i in 0..PER_AGENT.min(n - a * PER_AGENT) {
                let (cid, gen_, fmt) = match i % 100 {
                    0..45 => (
                        format!("c{i:03}"),
                        "{ kind = \"password\", length = 32 }",
                        "raw",
                    ),
                    45..67 => (
                        format!("c{i:03}"),
                        "{ kind = \"random_bytes\", length = 32, encoding = \"hex\" }",
                        "raw",
                    ),
                    67..89 => (
                        format!("c{i:03}"),
                        "{ kind = \"random_bytes\", length = 48, encoding = \"base64url\" }",
                        "raw",
                    ),
                    89..99 => (
                        format!("c{i:03}"),
                        "{ kind = \"api_key\", prefix = \"kt_\", length = 32 }",
                        "raw",
                    ),
                    _ => (format!("k{i:03}"), "{ kind = \"ed25519\" }", ""),
                };
                let fmt = if fmt == "raw" && i % 3 == 0 {
                    "json"
                } else {
                    fmt
                };
                let name = if fmt == "json" {
                    format!("{cid}.json")
                } else {
                    cid.clone()
                };
                let fmt_kv = if fmt.is_empty() {
                    String::new()
                } else {
                    format!(", format = \"{fmt}\"")
                };
                let _ = write!(
                    s,
                    "[agents.{aid}.credentials.{cid}]\nvault = \"local\"\ngenerate = {gen_}\n\
                     every = \"24h\"\njitter = \"1h\"\ngrace = \"1h\"\n\
                     deliver = [{{ type = \"file\", path = \"{aid}/{name}\"{fmt_kv} }}]\n\n"
                );
            }
        }
        s
    }

    #[test]
    fn the_benchmark_config_reads_like_toml_reads_it() {
        let text = bench_config(10_000);
        let fast: File = from_str(&text).unwrap();
        assert_eq!(fast, toml::from_str::<File>(&text).unwrap());
        let table = accepts(&text);
        let agents = table["agents"].as_table().unwrap();
        assert_eq!(agents.len(), 100);
        assert_eq!(
            agents["a00099"]["credentials"].as_table().unwrap().len(),
            100
        );
    }

    /// `cargo test --release --lib config::fast_toml -- --ignored --nocapture`
    /// (wall time, and this thread's CPU time, which a busy machine inflates less).
    #[test]
    #[ignore = "timing, for a release build"]
    fn time_100k_credentials() {
        fn cpu() -> std::time::Duration {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: a valid out-pointer for the duration of the call.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
        }
        let text = bench_config(100_000);
        for _ in 0..3 {
            let (t, c) = (std::time::Instant::now(), cpu());
            let doc = Parser::new(&text).unwrap().parse().unwrap();
            let (parse, parse_cpu) = (t.elapsed(), cpu() - c);
            let (t, c) = (std::time::Instant::now(), cpu());
            let f: File = de::Deserialize::deserialize(NodeDe {
                doc: &doc,
                node: ROOT,
            })
            .unwrap();
            let (de, de_cpu) = (t.elapsed(), cpu() - c);
            println!(
                "{} bytes, {} nodes: parse {parse:?} (cpu {parse_cpu:?}), deserialize {de:?} (cpu {de_cpu:?})",
                text.len(),
                doc.nodes.len()
            );
            drop((f, doc));
        }
        let (t, c) = (std::time::Instant::now(), cpu());
        let f: File = from_str(&text).unwrap();
        println!(
            "fast_toml::from_str {:?} (cpu {:?})",
            t.elapsed(),
            cpu() - c
        );
        drop(f);
        let (t, c) = (std::time::Instant::now(), cpu());
        let f: File = toml::from_str(&text).unwrap();
        println!("toml::from_str {:?} (cpu {:?})", t.elapsed(), cpu() - c);
        drop(f);
    }
}
