use super::*;

const R: Destination = Destination::AnyMember;
const L: Destination = Destination::Leader;

fn write(s: &str) -> Reason {
    Reason::Write {
        statement: s.into(),
    }
}
fn func(s: &str) -> Reason {
    Reason::Function { name: s.into() }
}
fn cte(s: &str) -> Reason {
    Reason::WritableCte {
        statement: s.into(),
    }
}

/// (statement, destination, reason) outside a transaction block, for a
/// session that created the temporary table `scratch`, with
/// `read_only_functions = ["app.price_of", "tenant_id"]`.
fn table() -> Vec<(&'static str, Destination, Reason)> {
    use Reason::*;
    vec![
        // Plain reads.
        ("SELECT 1", R, ReadOnly),
        ("select * from accounts where id = 42", R, ReadOnly),
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            R,
            ReadOnly,
        ),
        ("VALUES (1, 'a'), (2, 'b')", R, ReadOnly),
        ("SHOW transaction_isolation", R, ReadOnly),
        ("SHOW ALL", R, ReadOnly),
        ("EXPLAIN SELECT * FROM t", R, ReadOnly),
        (
            "EXPLAIN (ANALYZE, BUFFERS) SELECT count(*) FROM t",
            R,
            ReadOnly,
        ),
        (
            "SELECT a, count(*) FROM t GROUP BY a HAVING count(*) > 1 ORDER BY 2 DESC LIMIT 5",
            R,
            ReadOnly,
        ),
        (
            "SELECT * FROM a JOIN b USING (id) LEFT JOIN c ON c.x = a.x",
            R,
            ReadOnly,
        ),
        ("WITH x AS (SELECT * FROM t) SELECT * FROM x", R, ReadOnly),
        (
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM r",
            R,
            ReadOnly,
        ),
        (
            "SELECT * FROM t WHERE id IN (SELECT id FROM u WHERE u.flag)",
            R,
            ReadOnly,
        ),
        ("SELECT 1 UNION SELECT 2 EXCEPT SELECT 3", R, ReadOnly),
        (
            "SELECT now(), current_date, lower('A'), upper(name), length(name) FROM t",
            R,
            ReadOnly,
        ),
        (
            "SELECT coalesce(a, 0), greatest(a, b), nullif(a, b) FROM t",
            R,
            ReadOnly,
        ),
        ("SELECT pg_catalog.lower('X')", R, ReadOnly),
        (
            "SELECT sum(x) OVER (PARTITION BY y ORDER BY z) FROM t",
            R,
            ReadOnly,
        ),
        ("SELECT jsonb_build_object('a', 1) -> 'a'", R, ReadOnly),
        ("SELECT * FROM generate_series(1, 10) g", R, ReadOnly),
        (
            "SELECT to_char(now(), 'YYYY'), date_trunc('day', now())",
            R,
            ReadOnly,
        ),
        ("SELECT current_setting('search_path')", R, ReadOnly),
        (
            "SELECT pg_last_wal_replay_lsn()",
            L,
            func("pg_last_wal_replay_lsn"),
        ),
        ("SELECT 1; SELECT 2", R, ReadOnly),
        ("SELECT app.price_of(42)", R, ReadOnly),
        ("SELECT tenant_id()", R, ReadOnly),
        ("SELECT other.tenant_id()", R, ReadOnly),
        ("/* comment */ SELECT 1 -- trailing", R, ReadOnly),
        ("SELECT $$;INSERT$$", R, ReadOnly),
        ("SELECT * FROM t TABLESAMPLE SYSTEM (10)", R, ReadOnly),
        ("SELECT * FROM t WHERE ctid = '(0,1)'", R, ReadOnly),
        ("TABLE accounts", R, ReadOnly),
        ("SELECT count(*) FROM \"Mixed Case\"", R, ReadOnly),
        // Writes and DDL.
        ("INSERT INTO t VALUES (1)", L, write("InsertStmt")),
        (
            "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1",
            L,
            write("UpdateStmt"),
        ),
        ("DELETE FROM t WHERE id = 1", L, write("DeleteStmt")),
        (
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET v = s.v",
            L,
            write("MergeStmt"),
        ),
        (
            "INSERT INTO t SELECT * FROM u RETURNING id",
            L,
            write("InsertStmt"),
        ),
        ("CREATE TABLE t (id int)", L, write("CreateStmt")),
        ("ALTER TABLE t ADD COLUMN x int", L, write("AlterTableStmt")),
        ("DROP TABLE t", L, write("DropStmt")),
        ("TRUNCATE t", L, write("TruncateStmt")),
        ("CREATE INDEX ON t (x)", L, write("IndexStmt")),
        ("VACUUM t", L, write("VacuumStmt")),
        ("COPY t FROM STDIN", L, write("CopyStmt")),
        ("COPY (SELECT 1) TO STDOUT", L, write("CopyStmt")),
        ("SET search_path = app", L, write("VariableSetStmt")),
        ("CALL do_things()", L, write("CallStmt")),
        ("DO $$ BEGIN PERFORM 1; END $$", L, write("DoStmt")),
        ("LOCK TABLE t", L, write("LockStmt")),
        ("PREPARE p AS SELECT 1", L, write("PrepareStmt")),
        ("EXECUTE p", L, write("ExecuteStmt")),
        ("LISTEN chan", L, write("ListenStmt")),
        ("NOTIFY chan", L, write("NotifyStmt")),
        (
            "DECLARE c CURSOR FOR SELECT 1",
            L,
            write("DeclareCursorStmt"),
        ),
        (
            "EXPLAIN ANALYZE INSERT INTO t VALUES (1)",
            L,
            write("InsertStmt"),
        ),
        ("EXPLAIN DELETE FROM t", L, write("DeleteStmt")),
        (
            "CREATE TEMP TABLE other_tmp (id int)",
            L,
            write("CreateStmt"),
        ),
        // Transaction blocks.
        ("BEGIN", L, TransactionControl),
        ("START TRANSACTION READ ONLY", L, TransactionControl),
        ("COMMIT", L, TransactionControl),
        ("BEGIN; SELECT 1; COMMIT", L, TransactionControl),
        ("SAVEPOINT s1", L, TransactionControl),
        // Writes hidden in reads.
        (
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            L,
            cte("DeleteStmt"),
        ),
        (
            "WITH i AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM i",
            L,
            cte("InsertStmt"),
        ),
        (
            "SELECT * FROM (SELECT 1) s WHERE EXISTS (SELECT 1) ; WITH u AS (UPDATE t SET x = 1 RETURNING 1) SELECT * FROM u",
            L,
            cte("UpdateStmt"),
        ),
        ("SELECT * INTO new_table FROM t", L, SelectInto),
        ("SELECT * FROM t FOR UPDATE", L, LockingClause),
        (
            "SELECT * FROM t WHERE id = 1 FOR SHARE SKIP LOCKED",
            L,
            LockingClause,
        ),
        (
            "SELECT * FROM (SELECT * FROM t FOR NO KEY UPDATE) s",
            L,
            LockingClause,
        ),
        // Functions.
        ("SELECT nextval('s')", L, func("nextval")),
        ("SELECT setval('s', 10)", L, func("setval")),
        ("SELECT currval('s')", L, func("currval")),
        ("SELECT random()", L, func("random")),
        (
            "SELECT id FROM t ORDER BY random() LIMIT 1",
            L,
            func("random"),
        ),
        (
            "SELECT * FROM t WHERE x = (SELECT nextval('s'))",
            L,
            func("nextval"),
        ),
        ("SELECT my_func(1)", L, func("my_func")),
        ("SELECT public.lower('x')", L, func("public.lower")),
        ("SELECT pg_advisory_lock(1)", L, func("pg_advisory_lock")),
        (
            "SELECT set_config('a.b', 'c', false)",
            L,
            func("set_config"),
        ),
        ("SELECT txid_current()", L, func("txid_current")),
        ("SELECT pg_sleep(1)", L, func("pg_sleep")),
        (
            "SELECT * FROM t JOIN LATERAL audit_row(t.id) a ON true",
            L,
            func("audit_row"),
        ),
        ("SELECT count(*) FILTER (WHERE f(x)) FROM t", L, func("f")),
        (
            "SELECT 1 WHERE 2 = ANY (SELECT volatile_thing())",
            L,
            func("volatile_thing"),
        ),
        ("SELECT pg_notify('c', 'x')", L, func("pg_notify")),
        ("SELECT 1; INSERT INTO t VALUES (1)", L, write("InsertStmt")),
        ("SELECT 1; SELECT nextval('s')", L, func("nextval")),
        // Temporary tables.
        (
            "SELECT * FROM scratch",
            L,
            TempTable {
                name: "scratch".into(),
            },
        ),
        (
            "SELECT * FROM t JOIN scratch USING (id)",
            L,
            TempTable {
                name: "scratch".into(),
            },
        ),
        (
            "SELECT * FROM pg_temp.anything",
            L,
            TempTable {
                name: "pg_temp.anything".into(),
            },
        ),
        // Not SQL.
        (
            "SELEC 1",
            L,
            ParseFailure {
                message: String::new(),
            },
        ),
        (
            "SELECT * FROM",
            L,
            ParseFailure {
                message: String::new(),
            },
        ),
        ("", L, Empty),
        (";", L, Empty),
    ]
}

#[test]
fn routing_table() {
    let functions = ReadOnlyFunctions::new(&["app.price_of", "tenant_id"]);
    let temp: HashSet<String> = ["scratch".to_string()].into();
    let session = SessionState {
        in_transaction: false,
        temp_tables: &temp,
    };
    let cases = table();
    assert!(cases.len() >= 60, "{} cases", cases.len());
    let mut failures = Vec::new();
    for (sql, destination, reason) in cases {
        let mut got = classify(sql, session, &functions);
        // Parse messages come from libpg_query; only the kind is compared.
        if let Reason::ParseFailure { message } = &mut got.reason {
            assert!(!message.is_empty(), "{sql}: empty parse error");
            message.clear();
        }
        if got.destination != destination || got.reason != reason {
            failures.push(format!(
                "{sql:?}: got {got:?}, want {destination:?} {reason:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn inside_a_transaction_block_everything_goes_to_the_leader() {
    let functions = ReadOnlyFunctions::new::<&str>(&[]);
    let temp = HashSet::new();
    let session = SessionState {
        in_transaction: true,
        temp_tables: &temp,
    };
    for sql in [
        "SELECT 1",
        "SHOW work_mem",
        "COMMIT",
        "INSERT INTO t VALUES (1)",
    ] {
        assert_eq!(
            classify(sql, session, &functions),
            Decision::leader(Reason::InTransaction),
            "{sql}"
        );
    }
    // A parse failure is still reported as such.
    assert_eq!(
        classify("SELEC", session, &functions).reason.label(),
        "parse_failure"
    );
}

#[test]
fn analysis_lists_functions_relations_and_created_temp_tables() {
    let a = analyze("SELECT lower(n), app.f(1) FROM s.t JOIN u ON true");
    assert_eq!(a.kind, Kind::Read);
    assert_eq!(a.functions, vec!["app.f", "lower"]);
    assert_eq!(a.relations, vec!["s.t", "u"]);
    let a = analyze("CREATE TEMPORARY TABLE Scratch (id int)");
    assert_eq!(a.creates_temp, vec!["scratch"]);
    let a = analyze("CREATE TEMP TABLE x AS SELECT 1");
    assert_eq!(a.creates_temp, vec!["x"]);
    assert!(analyze("CREATE TABLE y (id int)").creates_temp.is_empty());
}

#[test]
fn the_builtin_list_has_stable_and_immutable_functions_only() {
    let f = ReadOnlyFunctions::new::<&str>(&[]);
    for name in [
        "now",
        "lower",
        "count",
        "abs",
        "to_char",
        "pg_catalog.upper",
    ] {
        assert!(f.is_read_only(name), "{name}");
    }
    for name in [
        "nextval",
        "setval",
        "random",
        "pg_sleep",
        "txid_current",
        "pg_current_wal_lsn",
        "myschema.lower",
    ] {
        assert!(!f.is_read_only(name), "{name}");
    }
}

#[test]
fn every_reason_has_a_metric_label_from_the_fixed_set() {
    let labels = [
        "read_only",
        "write",
        "in_transaction",
        "function",
        "parse_failure",
    ];
    for (sql, _, reason) in table() {
        assert!(labels.contains(&reason.label()), "{sql}");
        assert!(!reason.to_string().is_empty());
    }
}
