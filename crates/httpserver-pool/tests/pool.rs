//! The pool: storage, selection, group lifecycle, merge, duplicate, apply — with real servers.

mod support;

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http::StatusCode;
use httpserver_pool::{
    Error, Field, HttpServerConfig, Pattern, PemSource, Pool, ServerPoolConfig, StartPolicy, TlsConfig,
};
use pool_api::Lifecycle;
use support::*;

fn names(pool: &Pool) -> Vec<String> {
    let mut v = Vec::new();
    pool.walk(|s| {
        v.push(s.name());
        ControlFlow::Continue(())
    });
    v
}

#[tokio::test]
async fn store_load_has_len_delete_and_load_and_delete() {
    let pool = Pool::new();
    let api = pool.store_config(config("api", hello("api"))).unwrap();
    let bind = api.bind().to_string();
    assert!(pool.has(bind.as_str()) && pool.has(api.bind()));
    assert_eq!(pool.len(), 1);
    assert_eq!(pool.load(&bind).unwrap().name(), "api");
    assert_eq!(
        pool.load(format!("localhost:{}", api.bind().port())).unwrap().name(),
        "api",
        "keys are canonical"
    );
    pool.start().await.unwrap();
    let report = pool.delete(&bind).await.unwrap().expect("it was there");
    assert_eq!(report.forced, 0);
    assert!(!api.is_running(), "delete stops the server");
    assert!(pool.is_empty());
    assert!(pool.delete(&bind).await.unwrap().is_none());

    let web = pool.store_config(config("web", hello("web"))).unwrap();
    web.start().await.unwrap();
    let taken = pool.load_and_delete(web.bind()).unwrap();
    assert!(taken.is_running(), "load_and_delete hands the server over as it is");
    assert!(pool.is_empty());
    taken.stop().await.unwrap();
}

#[tokio::test]
async fn two_servers_on_one_address_are_an_error_never_an_overwrite() {
    let pool = Pool::new();
    let first = pool.store_config(config("first", hello("1"))).unwrap();
    let port = first.bind().port();
    let err = pool
        .store_config(HttpServerConfig::new("second", format!("localhost:{port}")).with_handler(hello("2")));
    assert!(matches!(err, Err(Error::DuplicateBind { .. })), "{err:?}");
    assert_eq!(pool.load(first.bind()).unwrap().name(), "first");

    let cfg = ServerPoolConfig {
        servers: vec![
            HttpServerConfig::new("a", format!(":{port}")).with_handler(hello("a")),
            HttpServerConfig::new("b", format!("0.0.0.0:{port}")).with_handler(hello("b")),
        ],
    };
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("duplicate bind") && e.contains("`a`"), "{e}");
}

#[tokio::test]
async fn validate_reports_every_problem_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut bad = HttpServerConfig::new("", "nowhere");
    bad.expose = Some("not a url".into());
    bad.tls = Some(TlsConfig {
        cert_chain: PemSource::File(dir.path().join("missing.pem")),
        key: PemSource::File(dir.path().join("missing.key")),
        client_ca: None,
    });
    bad.max_header_size = 100;
    bad.h2c = true;
    let e = ServerPoolConfig { servers: vec![bad] }.validate().unwrap_err();
    let Error::Invalid { problems } = &e else { panic!("{e}") };
    let fields: Vec<&str> = problems.iter().map(|p| p.field).collect();
    for f in ["name", "listen", "expose", "tls", "max_header_size", "h2c"] {
        assert!(fields.contains(&f), "{f} missing from {e}");
    }
    assert!(e.to_string().contains("missing.pem"), "{e}");
}

#[tokio::test]
async fn walk_walk_limit_filter_and_list_select_what_they_say() {
    let pool = Pool::new();
    let mut servers = Vec::new();
    for name in ["api-users", "api-orders", "admin"] {
        servers.push(pool.store_config(config(name, hello("x"))).unwrap());
    }
    let mut all = names(&pool);
    all.sort();
    assert_eq!(all, ["admin", "api-orders", "api-users"]);

    let mut seen = 0;
    pool.walk(|_| {
        seen += 1;
        ControlFlow::Break(())
    });
    assert_eq!(seen, 1, "breaking stops the walk");

    let mut limited = Vec::new();
    pool.walk_limit(&[servers[2].bind().to_string(), "127.0.0.1:1".to_string()], |s| {
        limited.push(s.name());
        ControlFlow::Continue(())
    });
    assert_eq!(limited, ["admin"]);

    let api = pool.filter(Field::Name, &Pattern::glob("API-*").unwrap());
    assert_eq!(api.len(), 2);
    assert_eq!(api.filter(Field::Name, &Pattern::regex("orders$").unwrap()).len(), 1, "filters chain");
    let by_bind =
        pool.list(Field::Bind, &Pattern::glob(&servers[0].bind().to_string()).unwrap(), Field::Name);
    assert_eq!(by_bind, ["api-users"]);
    let exposed = pool.list(Field::Expose, &Pattern::regex("^http://127\\.0\\.0\\.1:").unwrap(), Field::Name);
    assert_eq!(exposed.len(), 3);
    assert!(matches!(Pattern::regex("(["), Err(Error::Pattern { .. })), "an invalid pattern is an error");

    // A selection acts on the pool's servers.
    api.start(StartPolicy::AllOrNothing).await.unwrap();
    assert!(servers[0].is_running() && servers[1].is_running() && !servers[2].is_running());
    api.stop().await.unwrap();
    assert!(!servers[0].is_running());
}

#[tokio::test]
async fn start_stop_restart_run_every_server_and_serve() {
    let pool = Pool::new();
    let a = pool.store_config(config("a", hello("a"))).unwrap();
    let b = pool.store_config(config("b", hello("b"))).unwrap();
    let mut off = config("off", hello("off"));
    off.disabled = true;
    let off = pool.store_config(off).unwrap();
    pool.start().await.unwrap();
    assert!(pool.is_running() && pool.uptime().is_some());
    assert!(!off.is_running(), "a disabled server is kept but not started");
    let c = client();
    for s in [&a, &b] {
        assert_eq!(get(&c, &format!("http://{}/", s.bind())).await.unwrap().0, StatusCode::OK);
    }
    pool.restart().await.unwrap();
    assert_eq!(get(&client(), &format!("http://{}/", a.bind())).await.unwrap().1, "a");
    pool.stop().await.unwrap();
    assert!(!pool.is_running() && !a.is_running() && !b.is_running());
    assert_eq!(pool.uptime(), None);
}

#[tokio::test]
async fn all_or_nothing_rolls_back_and_best_effort_keeps_what_started() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let build = || {
        let pool = Pool::new();
        let good = pool.store_config(config("good", hello("g"))).unwrap();
        pool.store_config(
            HttpServerConfig::new("blocked", taken.local_addr().unwrap().to_string())
                .with_handler(hello("b")),
        )
        .unwrap();
        (pool, good)
    };
    let (pool, good) = build();
    let err = pool.start_with(StartPolicy::AllOrNothing).await.unwrap_err();
    assert!(
        matches!(&err, Error::Start { failures } if failures.len() == 1 && failures[0].name == "blocked"),
        "{err}"
    );
    assert!(!good.is_running(), "rolled back");

    let (pool, good) = build();
    let pool = pool.with_start_policy(StartPolicy::BestEffort);
    let err = pool.start().await.unwrap_err();
    assert!(err.to_string().contains("blocked"), "{err}");
    assert!(good.is_running(), "best effort keeps it");
    pool.stop().await.unwrap();
}

#[tokio::test]
async fn stopping_many_servers_runs_concurrently() {
    let pool = Pool::new();
    for i in 0..20 {
        let mut cfg = config(&format!("s{i}"), sleeper(Duration::from_millis(800)));
        cfg.timeouts.shutdown = Duration::from_secs(30);
        pool.store_config(cfg).unwrap();
    }
    pool.start().await.unwrap();
    let c = client();
    let mut requests = Vec::new();
    for s in pool.select_all().servers() {
        let (c, u) = (c.clone(), format!("http://{}/", s.bind()));
        requests.push(tokio::spawn(async move { get(&c, &u).await }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = pool.stop_all().await.unwrap();
    assert_eq!((report.drained, report.forced), (20, 0));
    // Serially this would take 20 × ~0.6 s; concurrently about one request's time.
    assert!(report.elapsed < Duration::from_secs(8), "{report:?}");
    for r in requests {
        assert_eq!(r.await.unwrap().unwrap().0, StatusCode::OK);
    }
}

#[tokio::test]
async fn duplicate_gives_independent_servers_and_merge_is_all_or_nothing() {
    let pool = Pool::new();
    let a = pool.store_config(config("a", hello("a"))).unwrap();
    let copy = pool.duplicate();
    let a2 = copy.load(a.bind()).unwrap();
    a.start().await.unwrap();
    assert!(!a2.is_running(), "the duplicate's server is another server");
    a.stop().await.unwrap();

    let other = Pool::new();
    let b = other.store_config(config("b", hello("b"))).unwrap();
    other
        .store_config(HttpServerConfig::new("a-again", a.bind().to_string()).with_handler(hello("x")))
        .unwrap();
    let err = pool.merge(&other).unwrap_err();
    assert!(matches!(&err, Error::MergeConflict { binds } if binds == &vec![a.bind()]), "{err}");
    assert_eq!((pool.len(), other.len()), (1, 2), "nothing moved");
    other.load_and_delete(a.bind());
    pool.merge(&other).unwrap();
    assert!(pool.has(b.bind()) && other.is_empty());
}

#[tokio::test]
async fn default_handler_and_tls_fill_configs_that_lack_them() {
    let pool = Pool::new();
    assert!(matches!(
        pool.store_config(HttpServerConfig::new("bare", free_addr())),
        Err(Error::MissingHandler { .. })
    ));
    pool.set_default_handler(hello("default"));
    let pki = TestPki::new();
    pool.set_default_tls(pki.server_tls());
    let s = pool.store_config(HttpServerConfig::new("bare", format!("localhost:{}", free_port()))).unwrap();
    pool.start().await.unwrap();
    let (status, body, _) = tls_get(pki.client_config(None, &[b"h2"]), s.bind(), "/").await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "default"));
    pool.stop().await.unwrap();
}

#[tokio::test]
async fn monitor_reports_state_and_counters_without_io() {
    let pool = Pool::new();
    let s = pool.store_config(config("m", hello("m"))).unwrap();
    assert!(!pool.monitor()[0].healthy);
    pool.start().await.unwrap();
    let c = client();
    for _ in 0..3 {
        get(&c, &format!("http://{}/", s.bind())).await.unwrap();
    }
    let snap = &pool.monitor()[0];
    assert!(snap.healthy && snap.uptime.is_some());
    assert_eq!(snap.counters.requests, 3);
    assert_eq!(snap.counters.accepted, 1, "keep-alive reuses one connection");
    assert_eq!(snap.counters.active, 1);
    pool.stop().await.unwrap();
    assert_eq!(pool.monitor()[0].counters.active, 0);
}

#[tokio::test]
async fn apply_adds_removes_swaps_and_leaves_unchanged_servers_alone() {
    let pool = Pool::new();
    let h = hello("v1");
    let keep = HttpServerConfig::new("keep", free_addr()).with_handler(h.clone());
    let change = HttpServerConfig::new("change", free_addr()).with_handler(h.clone());
    let gone = HttpServerConfig::new("gone", free_addr()).with_handler(h.clone());
    let initial = ServerPoolConfig { servers: vec![keep.clone(), change.clone(), gone.clone()] };
    pool.apply(&initial).await.unwrap();
    pool.start().await.unwrap();
    let c = client();
    let url = |cfg: &HttpServerConfig| format!("http://{}/", cfg.listen);
    assert_eq!(get(&c, &url(&change)).await.unwrap().1, "v1");
    let keep_uptime_before = pool.load(keep.listen.as_str()).unwrap().uptime().unwrap();

    let added = HttpServerConfig::new("added", free_addr()).with_handler(h.clone());
    let changed = change.clone().with_handler(hello("v2"));
    let report =
        pool.apply(&ServerPoolConfig { servers: vec![keep.clone(), changed, added.clone()] }).await.unwrap();
    let bind = |c: &HttpServerConfig| httpserver_pool::addr::canonical(&c.listen).unwrap();
    assert_eq!(report.unchanged, [bind(&keep)]);
    assert_eq!(report.swapped, [bind(&change)]);
    assert_eq!(report.added, [bind(&added)]);
    assert_eq!(report.removed, [bind(&gone)]);
    assert!(
        pool.load(keep.listen.as_str()).unwrap().uptime().unwrap() >= keep_uptime_before,
        "not restarted"
    );
    assert_eq!(get(&client(), &url(&change)).await.unwrap().1, "v2", "a new connection sees the new handler");
    assert_eq!(get(&client(), &url(&added)).await.unwrap().1, "v1", "added servers start");
    assert!(get(&client(), &url(&gone)).await.is_err(), "removed servers stop");
    pool.stop().await.unwrap();
}

#[tokio::test]
async fn a_broken_certificate_pair_is_rejected_and_the_old_one_kept_while_a_good_one_reaches_new_handshakes()
{
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let write_pair = |p: &Pair| {
        std::fs::write(&cert, &p.cert).unwrap();
        std::fs::write(&key, &p.key).unwrap();
    };
    let first = pki.issue(&["localhost"]);
    write_pair(&first);
    let mut cfg =
        HttpServerConfig::new("tls", format!("localhost:{}", free_port())).with_handler(hello("ok"));
    cfg.tls = Some(TlsConfig {
        cert_chain: PemSource::File(cert.clone()),
        key: PemSource::File(key.clone()),
        client_ca: None,
    });
    let pool_cfg = ServerPoolConfig { servers: vec![cfg] };
    let pool = Pool::from_config(&pool_cfg).unwrap();
    pool.start().await.unwrap();
    let server = pool.select_all().servers()[0].clone();
    let seen_cert = |pki: &TestPki| {
        let cfg = pki.client_config(None, &[b"http/1.1"]);
        let server = server.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(server.bind()).await.unwrap();
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect("localhost".try_into().unwrap(), tcp)
                .await
                .unwrap();
            tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
        }
    };
    let der = |pem: &str| {
        rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map(|c: rustls_pki_types::CertificateDer| c.to_vec())
            .unwrap()
    };
    assert_eq!(seen_cert(&pki).await, der(&first.cert));

    // Unchanged files: nothing happens.
    assert_eq!(pool.apply(&pool_cfg).await.unwrap().unchanged.len(), 1);

    // A key that does not match the certificate: rejected, the old pair keeps serving.
    let other = pki.issue(&["localhost"]);
    std::fs::write(&key, &other.key).unwrap();
    let err = pool.apply(&pool_cfg).await.unwrap_err();
    assert!(err.to_string().contains("do not match"), "{err}");
    assert_eq!(seen_cert(&pki).await, der(&first.cert));

    // A good new pair: the next handshake presents it.
    write_pair(&other);
    assert_eq!(pool.apply(&pool_cfg).await.unwrap().swapped.len(), 1);
    assert_eq!(seen_cert(&pki).await, der(&other.cert));
    pool.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_failed_requests_while_the_config_is_applied_every_100ms() {
    let pool = Arc::new(Pool::new());
    let addr = free_addr();
    let versions: Vec<HttpServerConfig> = (0..4)
        .map(|i| {
            let mut c =
                HttpServerConfig::new("steady", addr.clone()).with_handler(hello(["a", "b", "c", "d"][i]));
            c.timeouts.request = Some(Duration::from_secs(10 + i as u64));
            c
        })
        .collect();
    pool.apply(&ServerPoolConfig { servers: vec![versions[0].clone()] }).await.unwrap();
    pool.start().await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), format!("http://{addr}/"));
        clients.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                match get(&c, &url).await {
                    Ok((StatusCode::OK, _)) => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    for round in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let report =
            pool.apply(&ServerPoolConfig { servers: vec![versions[(round + 1) % 4].clone()] }).await.unwrap();
        assert_eq!(report.swapped.len(), 1);
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} failed out of {}", ok + failed);
    assert!(ok > 100, "the load was steady: {ok} requests");
    pool.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_applies_run_one_after_the_other() {
    let pool = Pool::new();
    pool.start().await.unwrap();
    for _ in 0..3 {
        // A server with a request in flight, so an apply that removes it waits for its drain.
        let old = config("old", sleeper(Duration::from_millis(300)));
        let old_listen = old.listen.clone();
        pool.apply(&ServerPoolConfig { servers: vec![old] }).await.unwrap();
        let old_bind = pool.select_all().servers()[0].bind();
        let slow = tokio::spawn(async move { get(&client(), &format!("http://{old_bind}/")).await });
        while pool.monitor()[0].counters.requests == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let listen = free_addr();
        let a =
            ServerPoolConfig { servers: vec![HttpServerConfig::new("x", &listen).with_handler(hello("a"))] };
        let b =
            ServerPoolConfig { servers: vec![HttpServerConfig::new("x", &listen).with_handler(hello("b"))] };
        // Overlapping, both would plan to add "x" while the first waits for the drain: two servers
        // for one address, one overwriting the other in the map while it runs.
        let (ra, rb) = tokio::join!(pool.apply(&a), pool.apply(&b));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!((ra.removed.len(), ra.added.len(), rb.swapped.len()), (1, 1, 1), "{ra:?} {rb:?}");
        assert_eq!(slow.await.unwrap().unwrap().1, "slept", "the removed server drained");
        assert_eq!(pool.len(), 1);
        let (status, body) = get(&client(), &format!("http://{listen}/")).await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "b"), "the later apply wins");
        pool.apply(&ServerPoolConfig::default()).await.unwrap();
        assert!(pool.is_empty());
        // Nothing kept running untracked: both addresses are free again.
        std::net::TcpListener::bind(&listen).expect("no orphaned server holds the address");
        std::net::TcpListener::bind(&old_listen).unwrap();
    }
    pool.stop().await.unwrap();
}
