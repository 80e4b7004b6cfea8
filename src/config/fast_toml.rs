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
    T::deserialize(NodeDe { doc: &doc, node: ROOT })
}

const NONE: u32 = u32::MAX;
const ROOT: u32 = 0;
/// Tables with more children than this get a hash index: `agents` (1,000
/// children at 100k credentials) and each `credentials` table (100) would
/// otherwise be scanned once per header.
const INDEX_AFTER: usize = 16;
/// Nesting of arrays and inline tables; deeper is refused rather than
/// risking the stack on hostile input.
const MAX_DEPTH: usize = 64;

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
                while let Some(b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-') = self.peek() {
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
        loop {
            match self.peek() {
                Some(b'"') => break,
                Some(b'\\') => return self.escaped_string(start),
                Some(b) if is_string_char(b) => self.pos += 1,
                _ => return err("invalid character in a string", self.pos),
            }
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
        loop {
            match self.peek() {
                Some(b'\'') => break,
                Some(b'\t' | 0x20..=0x26 | 0x28..=0x7e | 0x80..) => self.pos += 1,
                _ => return err("invalid character in a literal string", self.pos),
            }
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
            Some(false) => {
                match without_underscores(token).parse::<i64>() {
                    Ok(i) => Ok(Val::Int(i)),
                    Err(_) => err("integer out of range", start),
                }
            }
            Some(true) => {
                match without_underscores(token).parse::<f64>() {
                    Ok(f) if f.is_finite() => Ok(Val::Float(f)),
                    _ => err("float out of range", start),
                }
            }
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
        let wanted = self.doc.str(key);
        if indexed
            && let Some(&n) = self.index.get(&(table, self.hash(key)))
            && self.doc.str(self.doc.nodes[n as usize].key) == wanted
        {
            return Some(n);
        }
        let mut count = 0;
        let mut cur = first;
        while cur != NONE {
            let node = &self.doc.nodes[cur as usize];
            if self.doc.str(node.key) == wanted {
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

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
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
