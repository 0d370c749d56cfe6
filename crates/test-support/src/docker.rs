//! The Docker test harness: a real engine, a test image built without a registry, and test
//! containers and services that clean up after themselves.
//!
//! Everything here talks to the real engine on the local socket (`/var/run/docker.sock`, or
//! whatever bollard's socket defaults resolve to). Nothing is mocked.
//!
//! - [`engine`] connects and pings. Without an engine it returns `None` after printing a
//!   "skipping" line, unless the environment variable `CI` is `true` or `1`: then it panics, so a
//!   CI machine without Docker fails loudly instead of passing silently.
//! - [`test_image`] builds, once per process and once per content across processes, a
//!   `FROM scratch` image around the host's static busybox (`/bin/busybox`, Debian's
//!   `busybox-static`): `busybox httpd` on port 8080 serving `/www`, with an exec-form
//!   `HEALTHCHECK` that fetches `/` with `busybox wget` every 500 ms. The image is tagged
//!   [`IMAGE_REPO`]`:<content hash>`, so a second test process finds it with `inspect_image` and
//!   does not rebuild; the function returns the image id (`sha256:…`), which is also what a Swarm
//!   service must reference so that the worker never tries to pull.
//! - [`TestContainer::builder`] creates (and by default starts) a uniquely named container
//!   labelled `agentpool.test=<run id>` ([`TEST_LABEL`], [`run_id`]) with `init: true`, a short
//!   stop time-out and a chosen health check; dropping the [`TestContainer`] force-removes it.
//! - [`TestService::create`] does the same for a Swarm service, [`SwarmGuard::ensure`] provides
//!   a single-node swarm (and serialises the tests that use it), and [`cleanup_leftovers`]
//!   removes what crashed earlier runs left behind.
//!
//! Clean-up on `Drop` runs on a separate OS thread with a small current-thread runtime and its
//! own connection to the engine, so it never needs the (possibly dying) runtime of the test.
//! The dropping thread waits for it (through `block_in_place` on a multi-thread runtime), so a
//! test's last container is gone before the test process exits.
//!
//! # Example
//!
//! ```no_run
//! use test_support::docker::{self, TestContainer};
//!
//! # async fn demo() {
//! let Some(engine) = docker::engine().await else { return };
//! docker::cleanup_leftovers(&engine).await;
//! let container = TestContainer::builder("demo").create(&engine).await.expect("container");
//! let inspect = engine.inspect_container(container.name(), None).await.unwrap();
//! assert_eq!(inspect.state.unwrap().running, Some(true));
//! // dropped here: force-removed
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, HealthConfig, HostConfig, LocalNodeState, PortBinding, ServiceSpec, ServiceSpecMode,
    ServiceSpecModeReplicated, SwarmInitRequest, TaskSpec, TaskSpecContainerSpec,
};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateContainerOptionsBuilder, LeaveSwarmOptionsBuilder,
    ListContainersOptionsBuilder, ListServicesOptionsBuilder, RemoveContainerOptionsBuilder,
};
use futures_util::StreamExt;

/// The label every container and service made by the harness carries; its value is [`run_id`].
pub const TEST_LABEL: &str = "agentpool.test";

/// Repository name of the test image; the tag is a hash of the image's content.
pub const IMAGE_REPO: &str = "agentpool-test/busybox-httpd";

/// Where the static busybox is taken from (Debian package `busybox-static`).
pub const BUSYBOX_PATH: &str = "/bin/busybox";

/// The port `busybox httpd` listens on inside the test image.
pub const HTTP_PORT: u16 = 8080;

/// The Dockerfile of the test image. No `# syntax` line (that would make BuildKit pull a
/// frontend) and exec forms only (a scratch image has no `/bin/sh`).
pub const DOCKERFILE: &str = "FROM scratch
COPY busybox /bin/busybox
COPY www/index.html /www/index.html
ENTRYPOINT [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]
HEALTHCHECK --interval=500ms --timeout=1s --start-period=10s --retries=3 \
 CMD [\"/bin/busybox\", \"wget\", \"-q\", \"-O\", \"/dev/null\", \"http://127.0.0.1:8080/\"]
";

/// The page the test image serves at `/`.
pub const INDEX_HTML: &str = "<!doctype html><title>agentpool test</title><p>agentpool test container</p>\n";

/// How long a harness clean-up call may take before it is abandoned.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The id of this test process: `<pid>-<start time in ms>`, the value of [`TEST_LABEL`] on
/// everything it creates.
pub fn run_id() -> &'static str {
    static RUN_ID: OnceLock<String> = OnceLock::new();
    RUN_ID.get_or_init(|| {
        let millis = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        format!("{}-{millis}", std::process::id())
    })
}

/// A name unique across processes and calls: `agentpool-<prefix>-<run id>-<counter>`.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("agentpool-{prefix}-{}-{n}", run_id())
}

/// The labels every harness object carries: `{TEST_LABEL: run_id()}`.
pub fn test_labels() -> HashMap<String, String> {
    HashMap::from([(TEST_LABEL.to_owned(), run_id().to_owned())])
}

/// True when the environment variable `CI` is `true` or `1`: Docker is then required.
pub fn ci_requires_engine() -> bool {
    crate::in_ci()
}

/// Connects to the local engine and pings it.
///
/// Returns `None` (after printing `skipping: no Docker engine (…)` to stderr) when no engine
/// answers, or when the static busybox the test image needs is missing, so a test can
/// `let Some(docker) = engine().await else { return };`.
///
/// # Panics
///
/// When no engine answers (or busybox is missing) and [`ci_requires_engine`] is true.
pub async fn engine() -> Option<Docker> {
    let reason = match Docker::connect_with_socket_defaults() {
        // The test image is built around the host's static busybox: without it there is
        // nothing to run.
        Ok(_) if !std::path::Path::new(BUSYBOX_PATH).exists() => {
            format!("no static busybox at {BUSYBOX_PATH} (apt-get install busybox-static)")
        }
        Ok(docker) => match tokio::time::timeout(Duration::from_secs(10), docker.ping()).await {
            Ok(Ok(_)) => return Some(docker),
            Ok(Err(e)) => format!("ping failed: {e}"),
            Err(_) => "ping timed out after 10s".to_owned(),
        },
        Err(e) => format!("cannot connect to the local socket: {e}"),
    };
    if ci_requires_engine() {
        panic!("Docker engine required in CI: {reason}");
    }
    eprintln!("skipping: no Docker engine ({reason})");
    None
}

/// The build context of the test image as an in-memory tar archive: `Dockerfile`,
/// `busybox` (the given bytes, mode 0755) and `www/index.html`.
pub fn build_context(busybox: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut archive = tar::Builder::new(Vec::new());
    let mut append = |path: &str, mode: u32, data: &[u8]| -> std::io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_mtime(0);
        header.set_cksum();
        archive.append_data(&mut header, path, data)
    };
    append("Dockerfile", 0o644, DOCKERFILE.as_bytes())?;
    append("busybox", 0o755, busybox)?;
    append("www/index.html", 0o644, INDEX_HTML.as_bytes())?;
    archive.into_inner()
}

/// The tag of the test image for this busybox: a hash over the Dockerfile, the page and the
/// binary, so changing any of them builds a new image and an unchanged one is reused.
pub fn image_tag(busybox: &[u8]) -> String {
    let mut hasher = DefaultHasher::new();
    DOCKERFILE.hash(&mut hasher);
    INDEX_HTML.hash(&mut hasher);
    busybox.hash(&mut hasher);
    format!("c{:016x}", hasher.finish())
}

/// The id (`sha256:…`) of the test image, building it if this engine does not have it yet.
///
/// Built at most once per process (later calls return the cached id) and once per content
/// across processes (the content-hash tag is looked up first).
///
/// # Panics
///
/// When `/bin/busybox` is missing ("install busybox-static") or the build fails; the message
/// carries the engine's error.
pub async fn test_image(docker: &Docker) -> String {
    static IMAGE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    IMAGE.get_or_init(|| build_test_image(docker)).await.clone()
}

async fn build_test_image(docker: &Docker) -> String {
    let busybox = tokio::fs::read(BUSYBOX_PATH).await.unwrap_or_else(|e| {
        panic!("the Docker test image needs a static busybox at {BUSYBOX_PATH} ({e}): install busybox-static")
    });
    let reference = format!("{IMAGE_REPO}:{}", image_tag(&busybox));
    if let Ok(image) = docker.inspect_image(&reference).await
        && let Some(id) = image.id
    {
        return id;
    }
    let context = build_context(&busybox).expect("writing an in-memory tar archive cannot fail");
    let options = BuildImageOptionsBuilder::default()
        .dockerfile("Dockerfile")
        .t(&reference)
        .rm(true)
        .forcerm(true)
        .labels(&HashMap::from([("agentpool.test-image", "busybox-httpd")]))
        .build();
    let mut progress = docker.build_image(options, None, Some(bollard::body_full(context.into())));
    let mut log = String::new();
    while let Some(item) = progress.next().await {
        match item {
            Ok(info) => {
                if let Some(detail) = info.error_detail {
                    panic!("building the test image {reference} failed: {detail:?}\n{log}");
                }
                if let Some(line) = info.stream {
                    log.push_str(&line);
                }
            }
            Err(e) => panic!("building the test image {reference} failed: {e}\n{log}"),
        }
    }
    let image = docker
        .inspect_image(&reference)
        .await
        .unwrap_or_else(|e| panic!("the test image {reference} is missing after its build: {e}\n{log}"));
    image.id.unwrap_or_else(|| panic!("the engine reported no id for {reference}"))
}

/// The argv of a container that sleeps `delay` and then serves like the test image, so its
/// health check (from the image) stays `starting` for at least `delay`.
pub fn delayed_httpd(delay: Duration) -> Vec<String> {
    let secs = delay.as_secs_f64();
    let script =
        format!("{BUSYBOX_PATH} sleep {secs:.3}; exec {BUSYBOX_PATH} httpd -f -p {HTTP_PORT} -h /www");
    vec![BUSYBOX_PATH.to_owned(), "sh".to_owned(), "-c".to_owned(), script]
}

/// The argv of a container that exits with `code` after `after`.
pub fn exits_after(after: Duration, code: i32) -> Vec<String> {
    let secs = after.as_secs_f64();
    let script = format!("{BUSYBOX_PATH} sleep {secs:.3}; exit {code}");
    vec![BUSYBOX_PATH.to_owned(), "sh".to_owned(), "-c".to_owned(), script]
}

/// Which health check a test container runs.
#[derive(Clone, Debug, Default)]
pub enum HealthCheck {
    /// The image's: `busybox wget` of `/` every 500 ms (healthy as soon as httpd answers).
    #[default]
    Image,
    /// No health check (`NONE`): the engine reports no health at all.
    Disabled,
    /// A check that always fails (`busybox false`, every 500 ms, one retry, no start period):
    /// the container turns `unhealthy` about half a second after it starts.
    NeverPasses,
    /// Any other check.
    Custom(HealthConfig),
}

impl HealthCheck {
    fn config(&self) -> Option<HealthConfig> {
        match self {
            Self::Image => None,
            Self::Disabled => {
                Some(HealthConfig { test: Some(vec!["NONE".to_owned()]), ..Default::default() })
            }
            Self::NeverPasses => Some(HealthConfig {
                test: Some(vec!["CMD".to_owned(), BUSYBOX_PATH.to_owned(), "false".to_owned()]),
                interval: Some(500_000_000),
                timeout: Some(1_000_000_000),
                retries: Some(1),
                // 0 would inherit the image's 10 s start period; 1 ms is the engine's minimum.
                start_period: Some(1_000_000),
                start_interval: None,
            }),
            Self::Custom(config) => Some(config.clone()),
        }
    }
}

/// Builds a [`TestContainer`]; see [`TestContainer::builder`].
#[derive(Clone, Debug)]
pub struct TestContainerBuilder {
    prefix: String,
    labels: HashMap<String, String>,
    init: bool,
    health: HealthCheck,
    command: Option<Vec<String>>,
    env: Vec<String>,
    start: bool,
    stop_timeout: Duration,
    publish: Option<u16>,
}

/// A free loopback port to [`publish`](TestContainerBuilder::publish) on, chosen below the
/// kernel's ephemeral range. A port the kernel handed out for `127.0.0.1:0` can be taken again
/// as the local port of any outgoing connection (of this or of a parallel test) before Docker
/// binds it when the container starts; one below that range is only ever taken by a bind that
/// names it.
pub fn publishable_port() -> u16 {
    use std::hash::BuildHasher;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = (10_000u16, low.max(10_001));
    for attempt in 0u64..1000 {
        // A random start (the standard library's per-process random hasher keys), then tries.
        let pick = std::collections::hash_map::RandomState::new().hash_one(attempt);
        let port = from + (pick % u64::from(to - from)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {from}..{to} on 127.0.0.1");
}

impl TestContainerBuilder {
    /// Publishes the test image's HTTP port on `127.0.0.1:host_port` (default: not published),
    /// so a client on the host reaches the container at one address across restarts.
    pub fn publish(mut self, host_port: u16) -> Self {
        self.publish = Some(host_port);
        self
    }

    /// Adds a label (besides [`TEST_LABEL`], which is always set).
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Runs the container under docker-init (default `true`): signals reach busybox and stop
    /// takes milliseconds instead of the full time-out.
    pub fn init(mut self, init: bool) -> Self {
        self.init = init;
        self
    }

    /// The health check (default: the image's).
    pub fn health(mut self, health: HealthCheck) -> Self {
        self.health = health;
        self
    }

    /// Replaces the image's entrypoint with this argv (e.g. [`delayed_httpd`], [`exits_after`]).
    pub fn command(mut self, argv: Vec<String>) -> Self {
        self.command = Some(argv);
        self
    }

    /// Adds an environment variable (`KEY=VALUE`).
    pub fn env(mut self, var: impl Into<String>) -> Self {
        self.env.push(var.into());
        self
    }

    /// Whether to start the container after creating it (default `true`).
    pub fn start(mut self, start: bool) -> Self {
        self.start = start;
        self
    }

    /// The container's own stop time-out (default 1 s).
    pub fn stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }

    /// Creates the container from [`test_image`] (and starts it unless told not to).
    ///
    /// A container that was created but failed to start is removed before the error returns.
    pub async fn create(self, docker: &Docker) -> Result<TestContainer, DockerError> {
        let image = test_image(docker).await;
        let name = unique_name(&self.prefix);
        let mut labels = self.labels;
        labels.extend(test_labels());
        let body = ContainerCreateBody {
            image: Some(image),
            labels: Some(labels),
            entrypoint: self.command.clone(),
            cmd: self.command.as_ref().map(|_| Vec::new()),
            env: (!self.env.is_empty()).then_some(self.env),
            healthcheck: self.health.config(),
            stop_timeout: Some(self.stop_timeout.as_secs().max(1) as i64),
            host_config: Some(HostConfig {
                init: Some(self.init),
                port_bindings: self.publish.map(|port| {
                    let binding =
                        PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(port.to_string()) };
                    HashMap::from([(format!("{HTTP_PORT}/tcp"), Some(vec![binding]))])
                }),
                ..Default::default()
            }),
            exposed_ports: self.publish.map(|_| vec![format!("{HTTP_PORT}/tcp")]),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        let created = docker.create_container(Some(options), body).await?;
        let container = TestContainer { id: created.id, name };
        if self.start {
            docker.start_container(&container.id, None).await?;
        }
        Ok(container)
    }
}

/// A uniquely named, labelled container on the local engine, force-removed on drop.
#[derive(Debug)]
pub struct TestContainer {
    id: String,
    name: String,
}

impl TestContainer {
    /// A builder: name `agentpool-<prefix>-<run id>-<n>`, `init: true`, the image's health
    /// check, started after creation, 1 s stop time-out.
    pub fn builder(prefix: &str) -> TestContainerBuilder {
        TestContainerBuilder {
            prefix: prefix.to_owned(),
            labels: HashMap::new(),
            init: true,
            health: HealthCheck::Image,
            command: None,
            env: Vec::new(),
            start: true,
            stop_timeout: Duration::from_secs(1),
            publish: None,
        }
    }

    /// The engine's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The name (no leading `/`).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestContainer {
    fn drop(&mut self) {
        let id = self.id.clone();
        run_cleanup(format!("removing test container {}", self.name), move |docker| async move {
            let options = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
            match docker.remove_container(&id, Some(options)).await {
                Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
                Err(e) => Err(e),
            }
        });
    }
}

/// A uniquely named, labelled replicated Swarm service running the test image by id (so the
/// worker never pulls), removed on drop.
#[derive(Debug)]
pub struct TestService {
    id: String,
    name: String,
}

impl TestService {
    /// Creates the service with `replicas` tasks: [`test_image`] by id, `init: true`, 1 s stop
    /// grace period, the image's health check, labels on the service and on its containers.
    pub async fn create(docker: &Docker, prefix: &str, replicas: u64) -> Result<Self, DockerError> {
        let image = test_image(docker).await;
        let name = unique_name(prefix);
        let spec = ServiceSpec {
            name: Some(name.clone()),
            labels: Some(test_labels()),
            task_template: Some(TaskSpec {
                container_spec: Some(TaskSpecContainerSpec {
                    image: Some(image),
                    labels: Some(test_labels()),
                    init: Some(true),
                    stop_grace_period: Some(1_000_000_000),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            mode: Some(ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated { replicas: Some(replicas as i64) }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = docker.create_service(spec, None).await?;
        let id = created.id.unwrap_or_else(|| name.clone());
        Ok(Self { id, name })
    }

    /// The engine's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestService {
    fn drop(&mut self) {
        let id = self.id.clone();
        run_cleanup(format!("removing test service {}", self.name), move |docker| async move {
            match docker.delete_service(&id).await {
                Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
                Err(e) => Err(e),
            }
        });
    }
}

/// Serialises the tests of one process that use Swarm (the swarm belongs to the whole engine).
static SWARM_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A single-node swarm for the duration of a test.
///
/// [`SwarmGuard::ensure`] waits for the other swarm tests of this process to finish, then
/// initialises a swarm (`advertise_addr 127.0.0.1`, listening on `0.0.0.0:2377`) unless one is
/// already active. Dropping the guard leaves the swarm (force) only if it initialised it, so a
/// developer's own swarm is never torn down. Swarm tests of *different* processes are not
/// serialised: keep them in one test binary.
pub struct SwarmGuard {
    initialised: bool,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl fmt::Debug for SwarmGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwarmGuard").field("initialised", &self.initialised).finish_non_exhaustive()
    }
}

impl SwarmGuard {
    /// Makes sure a swarm is active; see the type's docs.
    pub async fn ensure(docker: &Docker) -> Result<Self, DockerError> {
        let serial = SWARM_LOCK.lock().await;
        let info = docker.info().await?;
        let state = info.swarm.and_then(|s| s.local_node_state);
        let initialised = if state == Some(LocalNodeState::ACTIVE) {
            false
        } else {
            docker
                .init_swarm(SwarmInitRequest {
                    listen_addr: Some("0.0.0.0:2377".to_owned()),
                    advertise_addr: Some("127.0.0.1".to_owned()),
                    ..Default::default()
                })
                .await?;
            true
        };
        Ok(Self { initialised, _serial: serial })
    }

    /// True if this guard initialised the swarm (and will leave it on drop).
    pub fn initialised(&self) -> bool {
        self.initialised
    }
}

impl Drop for SwarmGuard {
    fn drop(&mut self) {
        if self.initialised {
            run_cleanup("leaving the test swarm".to_owned(), |docker| async move {
                docker.leave_swarm(Some(LeaveSwarmOptionsBuilder::default().force(true).build())).await
            });
        }
    }
}

/// Removes the containers and services that earlier test processes left behind: those carrying
/// [`TEST_LABEL`] with another run id whose process is gone (on systems without `/proc`: older
/// than one hour). Objects of test processes still running are left alone. Errors are printed,
/// not returned: clean-up is best effort.
pub async fn cleanup_leftovers(docker: &Docker) {
    let filters = HashMap::from([("label", vec![TEST_LABEL])]);
    match docker.list_services(Some(ListServicesOptionsBuilder::default().filters(&filters).build())).await {
        Ok(services) => {
            for service in services {
                let owner =
                    service.spec.as_ref().and_then(|s| s.labels.as_ref()).and_then(|l| l.get(TEST_LABEL));
                if let (Some(owner), Some(id)) = (owner, service.id.as_deref())
                    && is_leftover(owner, None)
                    && let Err(e) = docker.delete_service(id).await
                {
                    eprintln!("cleanup: removing leftover service {id}: {e}");
                }
            }
        }
        // An engine that is not a swarm manager has no services to clean.
        Err(DockerError::DockerResponseServerError { status_code: 503, .. }) => {}
        Err(e) => eprintln!("cleanup: listing leftover services: {e}"),
    }
    let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
    match docker.list_containers(Some(options)).await {
        Ok(containers) => {
            for container in containers {
                let owner = container.labels.as_ref().and_then(|l| l.get(TEST_LABEL));
                if let (Some(owner), Some(id)) = (owner, container.id.as_deref())
                    && is_leftover(owner, container.created)
                {
                    let options = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
                    if let Err(e) = docker.remove_container(id, Some(options)).await {
                        eprintln!("cleanup: removing leftover container {id}: {e}");
                    }
                }
            }
        }
        Err(e) => eprintln!("cleanup: listing leftover containers: {e}"),
    }
}

/// Whether an object labelled with run id `owner` (created at unix time `created`, if known) is
/// a leftover of a finished process.
pub fn is_leftover(owner: &str, created: Option<i64>) -> bool {
    if owner == run_id() {
        return false;
    }
    if Path::new("/proc/self").exists() {
        let pid = owner.split_once('-').map_or(owner, |(pid, _)| pid);
        return match pid.parse::<u32>() {
            Ok(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
            Err(_) => true,
        };
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    created.is_some_and(|created| now - created > 3600)
}

/// Runs an engine clean-up on its own thread and runtime with a fresh connection, and waits for
/// it without stalling a multi-thread tokio runtime. Failures are printed.
fn run_cleanup<F, Fut>(what: String, job: F)
where
    F: FnOnce(Docker) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), DockerError>>,
{
    let spawned = std::thread::Builder::new().name("docker-cleanup".to_owned()).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(e) => return eprintln!("cleanup: {what}: no runtime: {e}"),
        };
        runtime.block_on(async move {
            let docker = match Docker::connect_with_socket_defaults() {
                Ok(docker) => docker,
                Err(e) => return eprintln!("cleanup: {what}: {e}"),
            };
            match tokio::time::timeout(CLEANUP_TIMEOUT, job(docker)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("cleanup: {what}: {e}"),
                Err(_) => eprintln!("cleanup: {what}: timed out after {CLEANUP_TIMEOUT:?}"),
            }
        });
    });
    let handle = match spawned {
        Ok(handle) => handle,
        Err(e) => return eprintln!("cleanup: cannot spawn a thread: {e}"),
    };
    let join = move || {
        let _ = handle.join();
    };
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(join),
        _ => join(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_context_holds_the_three_files_with_modes() {
        let context = build_context(b"not really busybox").unwrap();
        let mut archive = tar::Archive::new(context.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            seen.push((path, entry.header().mode().unwrap(), entry.header().size().unwrap()));
        }
        assert_eq!(
            seen,
            vec![
                ("Dockerfile".to_owned(), 0o644, DOCKERFILE.len() as u64),
                ("busybox".to_owned(), 0o755, 18),
                ("www/index.html".to_owned(), 0o644, INDEX_HTML.len() as u64),
            ]
        );
    }

    #[test]
    fn image_tag_follows_the_content() {
        assert_eq!(image_tag(b"a"), image_tag(b"a"));
        assert_ne!(image_tag(b"a"), image_tag(b"b"));
        assert!(image_tag(b"a").starts_with('c'));
    }

    #[test]
    fn names_are_unique_and_carry_the_run_id() {
        let a = unique_name("x");
        let b = unique_name("x");
        assert_ne!(a, b);
        assert!(a.starts_with("agentpool-x-") && a.contains(run_id()), "{a}");
        assert_eq!(test_labels().get(TEST_LABEL).map(String::as_str), Some(run_id()));
    }

    #[test]
    fn leftovers_are_other_finished_runs_only() {
        assert!(!is_leftover(run_id(), Some(0)));
        if Path::new("/proc/self").exists() {
            let alive = format!("{}-1", std::process::id());
            assert!(!is_leftover(&alive, Some(0)));
            // pid 0 is never a process in /proc.
            assert!(is_leftover("0-1", None));
            assert!(is_leftover("garbage", None));
        }
    }

    #[test]
    fn commands_use_busybox_explicitly() {
        let argv = delayed_httpd(Duration::from_millis(1500));
        assert_eq!(argv[..3], [BUSYBOX_PATH, "sh", "-c"]);
        assert!(argv[3].contains("sleep 1.500; exec /bin/busybox httpd -f -p 8080"), "{}", argv[3]);
        assert!(exits_after(Duration::from_secs(1), 3)[3].ends_with("exit 3"));
    }
}
