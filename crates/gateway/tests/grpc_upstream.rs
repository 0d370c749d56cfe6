//! A gRPC service behind the gateway, with stock gRPC on both sides that no one here wrote:
//! Python's `grpcio` serves the standard health service as the upstream (`http2 = true`, h2c),
//! and a Python `grpcio` client calls it through the gateway's listener (`h2c = true`). A unary
//! call, a call whose status comes back in the trailers alone, and a server stream get through;
//! a method the route's agent blocks gets `PERMISSION_DENIED` and never reaches the server, and
//! a call routed to an upstream that is down gets `UNAVAILABLE`: the gateway's own answers come
//! as gRPC status, with its text as the message.
//!
//! Needs `python3` with `grpcio` and `grpcio-health-checking` (`.ci/run` installs them). Without
//! them the test says so and passes, except with `CI=true`, where it fails.

mod common;

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const SERVER: &str = r#"
import sys
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
servicer = health.HealthServicer()
servicer.set("demo", health_pb2.HealthCheckResponse.SERVING)
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
sys.stdin.read()  # until the test ends
server.stop(0)
"#;

const CLIENT: &str = r#"
import sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

name = health_pb2.HealthCheckResponse.ServingStatus.Name
with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service="demo"), timeout=20)
    print("check demo", name(reply.status), flush=True)
    try:
        stub.Check(health_pb2.HealthCheckRequest(service="missing"), timeout=20)
        print("check missing answered", flush=True)
    except grpc.RpcError as e:
        print("check missing", e.code().name, flush=True)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="demo"), timeout=20)
    print("watch demo", name(next(watch).status), flush=True)
    watch.cancel()
    try:
        channel.unary_unary("/grpc.health.v1.Health/Forbidden")(b"", timeout=20)
        print("forbidden answered", flush=True)
    except grpc.RpcError as e:
        print("forbidden", e.code().name, e.details(), flush=True)
    try:
        channel.unary_unary("/dead.Service/Call")(b"", timeout=20)
        print("dead answered", flush=True)
    except grpc.RpcError as e:
        print("dead", e.code().name, e.details(), flush=True)
"#;

/// True if Python gRPC is there; otherwise says why (and fails under CI).
async fn python_grpc() -> bool {
    let probe = Command::new("python3").args(["-c", "import grpc, grpc_health"]).output().await;
    let missing = match &probe {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(String::from_utf8_lossy(&out.stderr).into_owned()),
        Err(e) => Some(format!("python3: {e}")),
    };
    test_support::present_or_skip(missing.map(|why| {
        format!(
            "Python gRPC is not available ({}); install it with `pip install grpcio grpcio-health-checking`",
            why.trim()
        )
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_client_reaches_a_grpc_server_through_the_gateway() {
    if !python_grpc().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("server.py"), SERVER).unwrap();
    std::fs::write(dir.path().join("client.py"), CLIENT).unwrap();

    let mut server = Command::new("python3")
        .arg(dir.path().join("server.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let port: u16 = tokio::time::timeout(std::time::Duration::from_secs(60), lines.next_line())
        .await
        .expect("the Python server starts")
        .unwrap()
        .expect("it prints its port")
        .trim()
        .parse()
        .unwrap();

    // The route's agent: requests whose path starts with the forbidden method are blocked.
    let guard = common::uds_agent(
        dir.path(),
        "guard",
        test_support::BlockPath::new("/grpc.health.v1.Health/Forbidden"),
    )
    .await;
    let (listen, admin) =
        (format!("127.0.0.1:{}", common::free_port()), format!("127.0.0.1:{}", common::free_port()));
    let config = format!(
        r#"
        [[listeners]]
        name = "grpc"
        bind = "{listen}"
        h2c = true

        [admin]
        bind = "{admin}"

        [[upstreams]]
        name = "health"
        urls = ["http://127.0.0.1:{port}"]
        http2 = true

        [[upstreams]]
        name = "dead"
        urls = ["http://127.0.0.1:{dead}"]
        http2 = true

        [[agents]]
        name = "guard"
        endpoints = ["{endpoint}"]

        [[routes]]
        name = "dead"
        path_prefix = "/dead.Service/"
        upstream = "dead"

        [[routes]]
        name = "grpc"
        upstream = "health"
        agents = ["guard"]
        "#,
        endpoint = guard.endpoint,
        dead = common::free_port()
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let _gateway = common::run_file(&path, &admin).await;

    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        Command::new("python3").arg(dir.path().join("client.py")).arg(&listen).output(),
    )
    .await
    .expect("the client finishes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "check demo SERVING",
            "check missing NOT_FOUND",
            "watch demo SERVING",
            "forbidden PERMISSION_DENIED Forbidden",
            "dead UNAVAILABLE the upstream failed",
        ],
        "{stdout}"
    );

    // A WebSocket upgrade cannot go to an HTTP/2 upstream: 501, said at once.
    let mut ws = tokio::net::TcpStream::connect(&listen).await.unwrap();
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nHost: {listen}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    ws.write_all(upgrade.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(std::time::Duration::from_secs(20), ws.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed without an answer: {}", String::from_utf8_lossy(&head));
        head.extend_from_slice(&buf[..n]);
    }
    assert!(head.starts_with(b"HTTP/1.1 501"), "{}", String::from_utf8_lossy(&head));

    // The gateway counted them on the route.
    let ok = r#"gateway_requests_total{route="grpc",status="200"}"#;
    assert_eq!(common::metric(&admin, ok).await, Some(3.0), "{ok}");
    // The metrics say what happened in HTTP terms.
    let blocked = r#"gateway_requests_total{route="grpc",status="403"}"#;
    assert_eq!(common::metric(&admin, blocked).await, Some(1.0), "{blocked}");
    let failed = r#"gateway_requests_total{route="dead",status="502"}"#;
    assert_eq!(common::metric(&admin, failed).await, Some(1.0), "{failed}");
}
