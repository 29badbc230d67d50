//! The attacks of a hostile directory owner, replayed against
//! [`TrustedDir`]. Tests that need a second account run their checks only
//! as root (as CI does); the rest run as anyone.

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

use super::*;

fn nobody() -> Owner {
    Owner {
        uid: 65534,
        gid: 65534,
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A file outside the directory that an attacker would like overwritten.
fn victim(dir: &Path) -> PathBuf {
    let v = dir.join("victim");
    std::fs::write(&v, "precious\n").unwrap();
    v
}

#[test]
fn write_replaces_a_planted_symlink_and_leaves_its_target_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let v = victim(tmp.path());
    let d = TrustedDir::create(
        &tmp.path().join("d"),
        Owner::current(),
        0o700,
        Strictness::Private,
    )
    .unwrap();
    symlink(&v, d.join("fence.state")).unwrap();
    d.write("fence.state", b"armed 1 2\n", 0o600).unwrap();
    assert_eq!(std::fs::read_to_string(&v).unwrap(), "precious\n");
    let meta = std::fs::symlink_metadata(d.join("fence.state")).unwrap();
    assert!(
        meta.file_type().is_file(),
        "the link was replaced by a file"
    );
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(
        std::fs::read_to_string(d.join("fence.state")).unwrap(),
        "armed 1 2\n"
    );
}

#[test]
fn files_get_the_directory_owner_and_the_exact_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let owner = if is_root() {
        nobody()
    } else {
        Owner::current()
    };
    // A directory the PostgreSQL account owns, as a data directory is.
    let d =
        TrustedDir::create(&tmp.path().join("pg"), owner, 0o700, Strictness::OwnerOnly).unwrap();
    let old = nix::sys::stat::umask(Mode::from_bits_truncate(0o077));
    let written = d.write("postgresql.conf", b"port = 5432\n", 0o640);
    nix::sys::stat::umask(old);
    written.unwrap();
    let meta = std::fs::metadata(d.join("postgresql.conf")).unwrap();
    assert_eq!(meta.uid(), owner.uid);
    assert_eq!(meta.gid(), owner.gid);
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640, "umask ignored");
    let dir_meta = std::fs::metadata(d.path()).unwrap();
    assert_eq!(
        dir_meta.uid(),
        owner.uid,
        "a created directory is handed over"
    );
}

#[test]
fn a_symlinked_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = tmp.path().join("link");
    symlink(&real, &link).unwrap();
    for result in [
        TrustedDir::create(&link, Owner::current(), 0o700, Strictness::OwnerOnly),
        TrustedDir::open(&link, Owner::current(), Strictness::OwnerOnly),
    ] {
        assert!(
            matches!(result, Err(SafeFsError::Symlink { .. })),
            "{result:?}"
        );
    }
    let parent = TrustedDir::create(
        &tmp.path().join("parent"),
        Owner::current(),
        0o700,
        Strictness::Private,
    )
    .unwrap();
    symlink(&real, parent.join("run")).unwrap();
    let sub = parent.subdir("run", Owner::current(), 0o700, Strictness::OwnerOnly);
    assert!(matches!(sub, Err(SafeFsError::Symlink { .. })), "{sub:?}");
}

#[test]
fn a_directory_of_another_owner_is_not_taken_over() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("state");
    std::fs::create_dir(&d).unwrap();
    std::os::unix::fs::chown(&d, Some(nobody().uid), Some(nobody().gid)).unwrap();
    let r = TrustedDir::create(&d, Owner::current(), 0o711, Strictness::Private);
    assert!(
        matches!(r, Err(SafeFsError::WrongOwner { found: 65534, .. })),
        "{r:?}"
    );
    // And its owner is unchanged.
    assert_eq!(std::fs::metadata(&d).unwrap().uid(), 65534);
}

#[test]
fn a_private_directory_must_not_be_writable_by_others() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("state");
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
    let r = TrustedDir::create(&d, Owner::current(), 0o700, Strictness::Private);
    assert!(matches!(r, Err(SafeFsError::TooOpen { .. })), "{r:?}");
    // An owner-only directory (a data directory) is accepted as it is.
    TrustedDir::create(&d, Owner::current(), 0o700, Strictness::OwnerOnly).unwrap();
}

#[test]
fn reads_and_existence_checks_never_follow_links() {
    let tmp = tempfile::tempdir().unwrap();
    let v = victim(tmp.path());
    let d = TrustedDir::create(
        &tmp.path().join("d"),
        Owner::current(),
        0o700,
        Strictness::Private,
    )
    .unwrap();
    assert_eq!(d.read_to_string("missing").unwrap(), None);
    assert!(!d.is_file("missing").unwrap());
    symlink(&v, d.join("former-primary")).unwrap();
    assert!(matches!(
        d.read_to_string("former-primary"),
        Err(SafeFsError::Symlink { .. })
    ));
    assert!(d.is_file("former-primary").is_err());
    assert!(matches!(
        d.open_append("former-primary", 0o600),
        Err(SafeFsError::Symlink { .. })
    ));
    d.remove("former-primary").unwrap();
    assert!(v.exists(), "removing the link left the target alone");
    d.write_durable("former-primary", b"x\n", 0o600).unwrap();
    assert!(d.is_file("former-primary").unwrap());
    assert_eq!(
        d.read_to_string("former-primary").unwrap().as_deref(),
        Some("x\n")
    );
}

#[test]
fn writes_follow_the_opened_directory_even_after_it_is_swapped() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("state");
    let d = TrustedDir::create(&path, Owner::current(), 0o700, Strictness::Private).unwrap();
    // Whoever can write the parent renames the directory away and puts
    // another in its place: the agent keeps using the one it checked.
    std::fs::rename(&path, tmp.path().join("moved")).unwrap();
    std::fs::create_dir(&path).unwrap();
    d.write("fence.state", b"exit\n", 0o600).unwrap();
    assert!(tmp.path().join("moved/fence.state").exists());
    assert!(!path.join("fence.state").exists());
}

#[test]
fn log_files_are_appended_and_keep_their_owner() {
    let tmp = tempfile::tempdir().unwrap();
    let d = TrustedDir::create(
        &tmp.path().join("d"),
        Owner::current(),
        0o700,
        Strictness::Private,
    )
    .unwrap();
    for line in ["one\n", "two\n"] {
        let mut f = d.open_append("keeper.log", 0o600).unwrap();
        f.write_all(line.as_bytes()).unwrap();
    }
    assert_eq!(
        std::fs::read_to_string(d.join("keeper.log")).unwrap(),
        "one\ntwo\n"
    );
    if is_root() {
        std::os::unix::fs::chown(d.join("keeper.log"), Some(65534), Some(65534)).unwrap();
        assert!(matches!(
            d.open_append("keeper.log", 0o600),
            Err(SafeFsError::WrongOwner { .. })
        ));
    }
}

/// Agents of one host may share a directory (a backup repository) and start
/// at once: none may find it between another's `mkdir` and `chown` and
/// refuse it as someone else's.
#[test]
fn concurrent_creators_all_find_the_directory_with_its_final_owner() {
    let owner = if is_root() {
        nobody()
    } else {
        Owner::current()
    };
    for round in 0..20 {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("shared").join(format!("repo{round}"));
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let target = target.clone();
                    scope.spawn(move || {
                        TrustedDir::create(&target, owner, 0o700, Strictness::Private)
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            r.unwrap();
        }
        let meta = std::fs::metadata(&target).unwrap();
        assert_eq!(meta.uid(), owner.uid);
        assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
        let leftovers: Vec<_> = std::fs::read_dir(target.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().ends_with(".pgha-tmp"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "temporary directories left: {leftovers:?}"
        );
    }
}

#[test]
fn untrusted_files_are_read_without_following_links_or_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("postmaster.pid");
    std::fs::write(&file, b"1234\n/data\n").unwrap();
    assert_eq!(
        read_untrusted(&file, 4096, false).as_deref(),
        Some(&b"1234\n/data\n"[..])
    );
    // At most `max` bytes, from the start or the end.
    assert_eq!(
        read_untrusted(&file, 4, false).as_deref(),
        Some(&b"1234"[..])
    );
    assert_eq!(
        read_untrusted(&file, 5, true).as_deref(),
        Some(&b"data\n"[..])
    );
    // A link planted in its place, even to a readable file, is refused;
    // so are a device that never ends and a FIFO nobody writes to.
    let link = dir.path().join("link.pid");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    assert_eq!(read_untrusted(&link, 4096, false), None);
    let zero = dir.path().join("zero.pid");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    assert_eq!(read_untrusted(&zero, 4096, false), None);
    let fifo = dir.path().join("fifo.pid");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    assert_eq!(read_untrusted(&fifo, 4096, false), None);
    assert_eq!(
        read_untrusted(&dir.path().join("missing"), 4096, false),
        None
    );
}
