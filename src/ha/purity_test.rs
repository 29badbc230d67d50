//! Keeps `ha` pure: the decision logic must not reach for I/O, the clock
//! or async machinery. A failing line here means a side effect crept into
//! code that the table tests assume is a pure function.

const FORBIDDEN: &[&str] = &[
    "tokio",
    "etcd_client",
    "std::fs",
    "std::net",
    "std::process",
    ".await",
    "Instant::now",
    "SystemTime::now",
    "boottime_ms",
    "unix_ms()",
    "reqwest",
];

#[test]
fn ha_module_has_no_io() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ha");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".rs") || name == "purity_test.rs" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in FORBIDDEN {
                assert!(
                    !code.contains(word),
                    "{name}:{}: `{word}` is not allowed in the pure ha module: {line}",
                    n + 1
                );
            }
        }
        checked += 1;
    }
    assert!(
        checked >= 4,
        "expected to check the ha sources, found {checked}"
    );
}
