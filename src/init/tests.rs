use std::sync::Mutex;

use super::*;

/// A clock that records `set` calls.
struct FakeClock {
    now: DateTime<Utc>,
    sets: Arc<Mutex<Vec<DateTime<Utc>>>>,
}

impl Clock for FakeClock {
    fn now(&self) -> DateTime<Utc> {
        self.now
    }
    fn set(&self, to: DateTime<Utc>) -> std::io::Result<()> {
        self.sets.lock().unwrap().push(to);
        Ok(())
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    init: Initializer,
    env: GlobalEnv,
    sets: Arc<Mutex<Vec<DateTime<Utc>>>>,
}

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let paths = InitPaths {
        ca_bundle: dir.path().join("certs/ca-certificates.crt"),
        ca_copy: dir.path().join("local/e2b-ca.crt"),
        hosts: dir.path().join("hosts"),
        run_dir: dir.path().join("run"),
        kernel_cmdline: dir.path().join("cmdline"),
        trust_file: Some(dir.path().join("trust")),
    };
    std::fs::create_dir_all(dir.path().join("certs")).unwrap();
    std::fs::write(&paths.ca_bundle, "SYSTEM CERTS\n").unwrap();
    std::fs::write(&paths.hosts, "127.0.0.1 localhost\n").unwrap();
    std::fs::write(&paths.kernel_cmdline, "console=ttyS0 quiet\n").unwrap();
    let env = GlobalEnv::new(crate::env::internal_vars());
    let sets = Arc::new(Mutex::new(Vec::new()));
    let init = Initializer::new(
        Arc::new(AccessToken::default()),
        env.clone(),
        paths,
        Box::new(FakeClock {
            now: now(),
            sets: sets.clone(),
        }),
    );
    Fixture {
        dir,
        init,
        env,
        sets,
    }
}

fn req(token: Option<&str>) -> InitRequest {
    InitRequest {
        access_token: token.map(str::to_string),
        ..Default::default()
    }
}

#[tokio::test]
async fn first_boot_then_token_required() {
    let f = fixture();
    f.init
        .init(req(Some("t1")))
        .await
        .expect("first boot is open");
    assert_eq!(f.init.token.get().as_deref(), Some("t1"));
    assert!(matches!(
        f.init.init(req(Some("other"))).await,
        Err(InitError::Unauthorized)
    ));
    assert!(matches!(
        f.init.init(req(None)).await,
        Err(InitError::Unauthorized)
    ));
    // The current token re-initialises (idempotent), and may rotate itself away.
    f.init.init(req(Some("t1"))).await.expect("same token");
    let mut r = req(Some("t1"));
    r.env_vars = Some(BTreeMap::from([("A".into(), "1".into())]));
    f.init.init(r).await.unwrap();
    assert_eq!(
        f.env.user_vars(),
        BTreeMap::from([("A".into(), "1".into())])
    );
}

#[tokio::test]
async fn the_host_trust_anchor_authorizes_a_new_token() {
    let f = fixture();
    f.init.init(req(Some("old"))).await.unwrap();
    let hex: String = sha2::Sha256::digest(b"new")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(f.dir.path().join("trust"), &hex).unwrap();
    f.init
        .init(req(Some("new")))
        .await
        .expect("anchor admits the new token");
    assert_eq!(f.init.token.get().as_deref(), Some("new"));
    // With an anchor published, first-boot openness is gone: a guest process that
    // cleared nothing cannot take over.
    assert!(matches!(
        f.init.init(req(Some("evil"))).await,
        Err(InitError::Unauthorized)
    ));
    // The kernel command line wins over the file.
    let hex2: String = sha2::Sha256::digest(b"")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(
        f.dir.path().join("cmdline"),
        format!("quiet guestd.init_token_sha256={hex2}\n"),
    )
    .unwrap();
    f.init
        .init(req(None))
        .await
        .expect("anchor of the empty string clears the token");
    assert!(!f.init.token.is_set());
}

#[tokio::test]
async fn stale_timestamps_skip_the_data() {
    let f = fixture();
    let mut r = req(None);
    r.timestamp = Some("2026-01-01T00:00:10Z".into());
    r.env_vars = Some(BTreeMap::from([("V".into(), "new".into())]));
    assert!(f.init.init(r.clone()).await.unwrap().fresh);
    let mut stale = r.clone();
    stale.env_vars = Some(BTreeMap::from([("V".into(), "stale".into())]));
    let applied = f.init.init(stale).await.unwrap();
    assert!(!applied.fresh);
    assert_eq!(f.env.user_vars()["V"], "new");
}

#[tokio::test]
async fn clock_is_set_only_outside_the_window() {
    for (offset_ms, expect_set) in [(30i64, false), (60, true), (-4_000, false), (-6_000, true)] {
        let f = fixture();
        let mut r = req(None);
        let host = now() + chrono::Duration::milliseconds(offset_ms);
        r.timestamp = Some(host.to_rfc3339());
        f.init.init(r).await.unwrap();
        assert_eq!(
            !f.sets.lock().unwrap().is_empty(),
            expect_set,
            "offset {offset_ms} ms"
        );
    }
}

#[tokio::test]
async fn bad_timestamp_is_an_error() {
    let f = fixture();
    let mut r = req(None);
    r.timestamp = Some("yesterday".into());
    assert!(matches!(f.init.init(r).await, Err(InitError::Timestamp(_))));
}

#[tokio::test]
async fn ca_bundle_install_is_idempotent_and_replaces_the_previous_one() {
    let f = fixture();
    let store = f.dir.path().join("certs/ca-certificates.crt");
    let mut r = req(None);
    r.ca_bundle = Some("-----BEGIN CERTIFICATE-----\nONE\n-----END CERTIFICATE-----\n".into());
    f.init.init(r.clone()).await.unwrap();
    f.init.init(r.clone()).await.unwrap();
    let text = std::fs::read_to_string(&store).unwrap();
    assert_eq!(text.matches("ONE").count(), 1, "{text}");
    assert!(text.starts_with("SYSTEM CERTS\n"));
    r.ca_bundle = Some("-----BEGIN CERTIFICATE-----\nTWO\n-----END CERTIFICATE-----\n".into());
    f.init.init(r).await.unwrap();
    let text = std::fs::read_to_string(&store).unwrap();
    assert!(!text.contains("ONE") && text.contains("TWO"), "{text}");
    assert!(
        std::fs::read_to_string(f.dir.path().join("local/e2b-ca.crt"))
            .unwrap()
            .contains("TWO")
    );
}

#[tokio::test]
async fn hyperloop_and_identity() {
    let f = fixture();
    let mut r = req(None);
    r.hyperloop_ip = Some("10.1.2.3".into());
    r.sandbox_id = Some("sbx-1".into());
    f.init.init(r.clone()).await.unwrap();
    f.init.init(r).await.unwrap();
    let hosts = std::fs::read_to_string(f.dir.path().join("hosts")).unwrap();
    assert_eq!(hosts.matches("events.e2b.local").count(), 1, "{hosts}");
    assert!(hosts.contains("10.1.2.3 events.e2b.local"));
    let env = f.env.snapshot();
    assert_eq!(env["E2B_EVENTS_ADDRESS"], "http://10.1.2.3");
    assert_eq!(env["E2B_SANDBOX_ID"], "sbx-1");
    assert_eq!(
        std::fs::read_to_string(f.dir.path().join("run/.E2B_SANDBOX_ID")).unwrap(),
        "sbx-1"
    );
    let mut bad = req(None);
    bad.hyperloop_ip = Some("not-an-ip".into());
    assert!(matches!(
        f.init.init(bad).await,
        Err(InitError::HyperloopIp(_))
    ));
}

#[tokio::test]
async fn defaults_are_remembered() {
    let f = fixture();
    let mut r = req(None);
    r.default_user = Some("user".into());
    r.default_workdir = Some("/work".into());
    let a = f.init.init(r).await.unwrap();
    assert_eq!(a.default_user.as_deref(), Some("user"));
    let a = f.init.init(req(None)).await.unwrap();
    assert_eq!(
        a.default_workdir.as_deref(),
        Some(Path::new("/work")),
        "empty fields keep the last value"
    );
}
