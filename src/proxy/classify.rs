//! Whether a statement may run on a replica: the auto listener's routing
//! decision, a pure function of the statement text and the session's state.
//!
//! The text is parsed with PostgreSQL's own grammar (libpg_query through
//! the `pg_query` crate), in two steps so that a prepared statement is
//! parsed once, at `Parse` time:
//!
//! 1. [`analyze`] (no session state, cacheable): what kind of statement it
//!    is, which functions it calls, which relations it reads.
//! 2. [`decide`]: the [`Decision`] for that analysis in the session's
//!    current state (in a transaction block? which temporary tables did it
//!    create?) and with the known read-only functions.
//!
//! A statement goes to a replica only when it is *provably* read-only;
//! anything the classifier does not understand goes to the leader.
//!
//! The walk over the parse tree is generic (the tree's serde form), not a
//! list of the node types the author thought of: a function call or a
//! data-modifying statement anywhere in the tree is found, whatever
//! clause it hides in.

use std::collections::HashSet;
use std::fmt;

use serde_json::Value;

/// Names of the built-in functions whose every overload is immutable or
/// stable, from `pg_proc` of PostgreSQL 15 (regenerate with
/// `scripts/gen-read-only-functions.sh`).
const BUILTIN_READ_ONLY: &str = include_str!("classify/read_only_functions.txt");

/// Where a statement may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// A replica (or the leader, when no replica qualifies).
    AnyMember,
    Leader,
}

/// Why a statement goes where it goes. Tests compare these, not text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// SELECT, VALUES, SHOW or EXPLAIN of one, with nothing that writes.
    ReadOnly,
    /// A statement other than a read (its parse node name: `InsertStmt`,
    /// `CreateStmt`, ...).
    Write { statement: String },
    /// `SELECT ... INTO`.
    SelectInto,
    /// `FOR UPDATE` / `FOR SHARE` and friends.
    LockingClause,
    /// INSERT/UPDATE/DELETE/MERGE inside a read (a writable CTE).
    WritableCte { statement: String },
    /// The session is inside an explicit transaction block.
    InTransaction,
    /// BEGIN, COMMIT, SAVEPOINT, ...
    TransactionControl,
    /// A function that is neither a built-in immutable/stable one nor
    /// listed in `read_only_functions` (this includes `nextval`/`setval`).
    Function { name: String },
    /// A relation the session created as a temporary table (it exists
    /// only on the leader).
    TempTable { name: String },
    /// The parser refused the text (the leader will say why).
    ParseFailure { message: String },
    /// No statement at all (an empty query string).
    Empty,
}

impl Reason {
    /// The metric label: one of a few fixed categories.
    pub fn label(&self) -> &'static str {
        match self {
            Reason::ReadOnly => "read_only",
            Reason::Write { .. }
            | Reason::SelectInto
            | Reason::LockingClause
            | Reason::WritableCte { .. }
            | Reason::TempTable { .. }
            | Reason::Empty => "write",
            Reason::InTransaction | Reason::TransactionControl => "in_transaction",
            Reason::Function { .. } => "function",
            Reason::ParseFailure { .. } => "parse_failure",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::ReadOnly => write!(f, "read-only statement"),
            Reason::Write { statement } => write!(f, "not a read ({statement})"),
            Reason::SelectInto => write!(f, "SELECT INTO creates a table"),
            Reason::LockingClause => write!(f, "locking clause (FOR UPDATE/SHARE)"),
            Reason::WritableCte { statement } => {
                write!(f, "data-modifying statement inside a read ({statement})")
            }
            Reason::InTransaction => write!(f, "inside a transaction block"),
            Reason::TransactionControl => write!(f, "transaction control statement"),
            Reason::Function { name } => {
                write!(f, "function {name} is not known to be read-only")
            }
            Reason::TempTable { name } => {
                write!(f, "temporary table {name} exists only on the leader")
            }
            Reason::ParseFailure { message } => write!(f, "parse failure: {message}"),
            Reason::Empty => write!(f, "empty statement"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub destination: Destination,
    pub reason: Reason,
}

impl Decision {
    fn leader(reason: Reason) -> Decision {
        Decision {
            destination: Destination::Leader,
            reason,
        }
    }
}

/// What the parser says about a statement string, independent of the
/// session (cached per prepared statement).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Analysis {
    pub kind: Kind,
    /// Called functions, lower-case, schema-qualified when written so.
    pub functions: Vec<String>,
    /// Relations read, as written (`name` or `schema.name`).
    pub relations: Vec<String>,
    /// Temporary tables this statement creates (for later statements).
    pub creates_temp: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Every statement is a read; functions and relations still to check.
    Read,
    /// At least one statement may write: the first such reason.
    NotRead(Reason),
    TransactionControl,
    ParseFailure(String),
    Empty,
}

/// Functions that may run on a replica: the built-in list plus the
/// configured `read_only_functions`.
#[derive(Clone, Debug)]
pub struct ReadOnlyFunctions {
    builtin: HashSet<&'static str>,
    configured: HashSet<String>,
}

impl ReadOnlyFunctions {
    /// `configured`: names as in the configuration, `name` (any schema)
    /// or `schema.name`; compared in lower case.
    pub fn new<S: AsRef<str>>(configured: &[S]) -> ReadOnlyFunctions {
        ReadOnlyFunctions {
            builtin: BUILTIN_READ_ONLY
                .lines()
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .collect(),
            configured: configured
                .iter()
                .map(|s| s.as_ref().to_ascii_lowercase())
                .collect(),
        }
    }

    pub fn is_read_only(&self, name: &str) -> bool {
        if self.configured.contains(name) {
            return true;
        }
        let (schema, base) = match name.rsplit_once('.') {
            Some((s, b)) => (Some(s), b),
            None => (None, name),
        };
        // A built-in only unqualified or in pg_catalog; a configured bare
        // name matches in any schema.
        (schema.is_none_or(|s| s == "pg_catalog") && self.builtin.contains(base))
            || self.configured.contains(base)
    }
}

/// The session state a decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct SessionState<'a> {
    /// Inside an explicit transaction block (last ReadyForQuery not `I`).
    pub in_transaction: bool,
    /// Temporary tables this client created, lower-case.
    pub temp_tables: &'a HashSet<String>,
}

/// Parses `sql` (one or more statements) and describes it.
pub fn analyze(sql: &str) -> Analysis {
    let mut a = Analysis {
        kind: Kind::Read,
        functions: Vec::new(),
        relations: Vec::new(),
        creates_temp: Vec::new(),
    };
    let parsed = match pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) {
        Ok(p) => p,
        Err(e) => {
            a.kind = Kind::ParseFailure(e.to_string());
            return a;
        }
    };
    if parsed.protobuf.stmts.is_empty() {
        a.kind = Kind::Empty;
        return a;
    }
    for raw in &parsed.protobuf.stmts {
        let Some(node) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) else {
            continue;
        };
        let kind = statement(node, &mut a);
        // The first statement that is not a read decides the reason;
        // transaction control outranks a plain read.
        match (&a.kind, kind) {
            (Kind::Read, k) | (Kind::TransactionControl, k @ Kind::NotRead(_)) => a.kind = k,
            _ => {}
        }
    }
    a.functions.sort();
    a.functions.dedup();
    a.relations.sort();
    a.relations.dedup();
    a
}

/// One top-level statement: its kind; reads also collect functions and
/// relations into `a`.
fn statement(node: &pg_query::NodeEnum, a: &mut Analysis) -> Kind {
    use pg_query::NodeEnum as N;
    match node {
        N::SelectStmt(_) => read_tree(node, a),
        N::VariableShowStmt(_) => Kind::Read,
        N::ExplainStmt(e) => match e.query.as_ref().and_then(|q| q.node.as_ref()) {
            // EXPLAIN ANALYZE runs the statement: the inner statement decides.
            Some(inner) => match statement(inner, a) {
                Kind::TransactionControl => Kind::NotRead(Reason::Write {
                    statement: "ExplainStmt".into(),
                }),
                k => k,
            },
            None => Kind::NotRead(Reason::Write {
                statement: "ExplainStmt".into(),
            }),
        },
        N::TransactionStmt(_) => Kind::TransactionControl,
        N::CreateStmt(c) => {
            if let Some(rel) = &c.relation
                && rel.relpersistence == "t"
            {
                a.creates_temp.push(rel.relname.to_ascii_lowercase());
            }
            not_read(node)
        }
        N::CreateTableAsStmt(c) => {
            if let Some(rel) = c.into.as_ref().and_then(|i| i.rel.as_ref())
                && rel.relpersistence == "t"
            {
                a.creates_temp.push(rel.relname.to_ascii_lowercase());
            }
            not_read(node)
        }
        _ => not_read(node),
    }
}

fn not_read(node: &pg_query::NodeEnum) -> Kind {
    Kind::NotRead(Reason::Write {
        statement: node_name(node),
    })
}

/// The parse node's name (`InsertStmt`, ...): the key of its serde form.
fn node_name(node: &pg_query::NodeEnum) -> String {
    match serde_json::to_value(node) {
        Ok(Value::Object(m)) => m.keys().next().cloned().unwrap_or_default(),
        _ => "unknown statement".into(),
    }
}

/// Walks a read's whole tree.
fn read_tree(node: &pg_query::NodeEnum, a: &mut Analysis) -> Kind {
    let Ok(tree) = serde_json::to_value(node) else {
        return Kind::NotRead(Reason::Write {
            statement: "unserializable tree".into(),
        });
    };
    let mut kind = Kind::Read;
    walk(&tree, a, &mut kind);
    kind
}

fn walk(v: &Value, a: &mut Analysis, kind: &mut Kind) {
    match v {
        Value::Object(map) => {
            for (key, child) in map {
                match key.as_str() {
                    "FuncCall" => {
                        if let Some(name) = dotted(&child["funcname"]) {
                            a.functions.push(name.to_ascii_lowercase());
                        }
                    }
                    "RangeVar" => {
                        let schema = child["schemaname"].as_str().unwrap_or_default();
                        let rel = child["relname"].as_str().unwrap_or_default();
                        a.relations.push(if schema.is_empty() {
                            rel.to_ascii_lowercase()
                        } else {
                            format!("{schema}.{rel}").to_ascii_lowercase()
                        });
                    }
                    "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
                        set_first(
                            kind,
                            Reason::WritableCte {
                                statement: key.clone(),
                            },
                        );
                    }
                    "into_clause" if !child.is_null() => set_first(kind, Reason::SelectInto),
                    "locking_clause" if child.as_array().is_some_and(|l| !l.is_empty()) => {
                        set_first(kind, Reason::LockingClause)
                    }
                    _ => {}
                }
                walk(child, a, kind);
            }
        }
        Value::Array(items) => {
            for item in items {
                walk(item, a, kind);
            }
        }
        _ => {}
    }
}

fn set_first(kind: &mut Kind, reason: Reason) {
    if *kind == Kind::Read {
        *kind = Kind::NotRead(reason);
    }
}

/// A list of `String` nodes (`[{"node": {"String": {"sval": "x"}}}, ...]`)
/// as `a.b`.
fn dotted(list: &Value) -> Option<String> {
    let parts: Vec<&str> = list
        .as_array()?
        .iter()
        .filter_map(|n| n["node"]["String"]["sval"].as_str())
        .collect();
    (!parts.is_empty()).then(|| parts.join("."))
}

/// The decision for an analysed statement in the session's state.
pub fn decide(a: &Analysis, session: SessionState<'_>, functions: &ReadOnlyFunctions) -> Decision {
    match &a.kind {
        Kind::ParseFailure(message) => {
            return Decision::leader(Reason::ParseFailure {
                message: message.clone(),
            });
        }
        Kind::Empty => return Decision::leader(Reason::Empty),
        _ if session.in_transaction => return Decision::leader(Reason::InTransaction),
        Kind::TransactionControl => return Decision::leader(Reason::TransactionControl),
        Kind::NotRead(reason) => return Decision::leader(reason.clone()),
        Kind::Read => {}
    }
    if let Some(name) = a.relations.iter().find(|r| {
        let base = r.strip_prefix("pg_temp.").unwrap_or(r);
        r.starts_with("pg_temp.") || session.temp_tables.contains(base)
    }) {
        return Decision::leader(Reason::TempTable { name: name.clone() });
    }
    if let Some(name) = a.functions.iter().find(|f| !functions.is_read_only(f)) {
        return Decision::leader(Reason::Function { name: name.clone() });
    }
    Decision {
        destination: Destination::AnyMember,
        reason: Reason::ReadOnly,
    }
}

/// `analyze` then `decide`: the whole decision for one string.
pub fn classify(sql: &str, session: SessionState<'_>, functions: &ReadOnlyFunctions) -> Decision {
    decide(&analyze(sql), session, functions)
}

#[cfg(test)]
mod tests;
