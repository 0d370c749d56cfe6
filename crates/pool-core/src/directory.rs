//! The pool's directory: which agents exist and which of their slots are connected, as one
//! immutable snapshot that readers reach without a single atomic read-modify-write. The
//! directory, not the agent, republishes an agent's entry when a connection comes or goes.
//!
//! Writers (adding or removing an agent, a connection coming or going — all rare) build a new
//! snapshot under a mutex, store it, and bump a generation counter. Readers keep a per-thread
//! cache of the last snapshot they saw with its generation; while the generation is
//! unchanged — the overwhelming case — a lookup is one plain load of the counter, a
//! thread-local access and a hash-map probe. On x86 an atomic RMW costs 10–25 ns and even an
//! uncontended `ArcSwap::load` pays two of them (take and return a debt slot), so this is what
//! keeps the pick path within its budget.
//!
//! A reader that raced a writer may use the snapshot from just before the write; that is the
//! same answer it would have got a moment earlier, so it is linearisable. The cost of the
//! cache: a thread keeps the last snapshot it used (and so the agents in it) alive until its
//! next lookup of any pool, which is memory only — removed agents' connections are closed by
//! their supervisors regardless.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use parking_lot::{Mutex, MutexGuard};

use crate::agent::{Agent, LiveSlots};

/// One agent as the hot path sees it.
#[derive(Clone)]
pub(crate) struct AgentView {
    pub(crate) agent: Arc<Agent>,
    /// The agent's connected slots, in slot order.
    pub(crate) live: LiveSlots,
    /// Agents this one replaced under the same id that are still draining, oldest first:
    /// events of requests pinned to one of their connections (correlation affinity) are
    /// still routed there. `None` — the usual case — costs the hot path one branch.
    pub(crate) retiring: Option<Arc<[Arc<Agent>]>>,
}

impl AgentView {
    /// The view of a freshly registered agent, replacing nothing.
    pub(crate) fn new(agent: Arc<Agent>) -> Self {
        let live = agent.live();
        Self { agent, live, retiring: None }
    }
}

pub(crate) type Agents = HashMap<Arc<str>, AgentView, foldhash::fast::RandomState>;

/// Every directory gets its own id, so a thread's cache can tell pools apart.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static CACHE: RefCell<Option<Cached>> = const { RefCell::new(None) };
}

struct Cached {
    directory: u64,
    generation: u64,
    agents: Arc<Agents>,
}

pub(crate) struct Directory {
    id: u64,
    generation: AtomicU64,
    current: ArcSwap<Agents>,
    writer: Mutex<()>,
}

/// Exclusive right to change the directory; dropping it without `publish` changes nothing.
pub(crate) struct Writer<'a> {
    directory: &'a Directory,
    _guard: MutexGuard<'a, ()>,
}

impl Directory {
    pub(crate) fn new() -> Self {
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            current: ArcSwap::from_pointee(Agents::default()),
            writer: Mutex::new(()),
        }
    }

    /// Runs `f` on the current snapshot. `f` must not look up the directory again.
    #[inline]
    pub(crate) fn with<R>(&self, f: impl FnOnce(&Agents) -> R) -> R {
        let generation = self.generation.load(Ordering::Acquire);
        CACHE.with(|cell| {
            {
                let cached = cell.borrow();
                if let Some(c) = &*cached
                    && c.directory == self.id
                    && c.generation == generation
                {
                    return f(&c.agents);
                }
            }
            // Loaded after reading the generation, so it is at least that new.
            let agents = self.current.load_full();
            *cell.borrow_mut() = Some(Cached { directory: self.id, generation, agents });
            let cached = cell.borrow();
            f(&cached.as_ref().expect("just stored").agents)
        })
    }

    /// A snapshot to hold (for slow paths that iterate).
    pub(crate) fn load(&self) -> Arc<Agents> {
        self.current.load_full()
    }

    pub(crate) fn write(&self) -> Writer<'_> {
        Writer { directory: self, _guard: self.writer.lock() }
    }

    /// Republishes `agent`'s connected slots after a connection came or went: the agent's own
    /// snapshot and, while the agent is registered, its entry here. Both are rebuilt under the
    /// writer lock, so an `add` that copies the agent's snapshot under the same lock never
    /// publishes an older one.
    pub(crate) fn republish(&self, agent: &Agent) {
        let writer = self.write();
        let live = agent.refresh_snapshot();
        let current = writer.current();
        // Only while registered: during add the entry does not exist yet (add copies the
        // snapshot under this lock), during removal it is already gone.
        if let Some(view) = current.get(agent.id())
            && std::ptr::eq(Arc::as_ptr(&view.agent), agent)
        {
            let mut next = Agents::clone(&current);
            next.insert(view.agent.shared.id.clone(), AgentView { live: live.clone(), ..view.clone() });
            writer.publish(next);
        }
        // Under the lock: a replacement hands the agent's gauges over under it too, so an
        // agent that has just lost them never overwrites its successor's.
        agent.snapshot_published(&live);
        drop(writer);
    }

    /// Forgets `agent`, a replaced agent that has finished draining: events pinned to it are
    /// no longer looked for there.
    pub(crate) fn retired(&self, agent: &Arc<Agent>) {
        let writer = self.write();
        let current = writer.current();
        let Some(view) = current.get(agent.id()) else { return };
        let Some(retiring) = &view.retiring else { return };
        if !retiring.iter().any(|a| Arc::ptr_eq(a, agent)) {
            return;
        }
        let rest: Vec<Arc<Agent>> = retiring.iter().filter(|a| !Arc::ptr_eq(a, agent)).cloned().collect();
        let mut next = Agents::clone(&current);
        next.insert(
            view.agent.shared.id.clone(),
            AgentView { retiring: (!rest.is_empty()).then(|| rest.into()), ..view.clone() },
        );
        writer.publish(next);
    }
}

impl Writer<'_> {
    pub(crate) fn current(&self) -> Arc<Agents> {
        self.directory.current.load_full()
    }

    /// Makes `agents` the current snapshot.
    pub(crate) fn publish(&self, agents: Agents) {
        self.directory.current.store(Arc::new(agents));
        self.directory.generation.fetch_add(1, Ordering::Release);
    }
}
