//! The mesh: the one task that owns the peer's state and decides everything.
//!
//! Connection tasks, stdin, the listener, timers and signals all feed this task; it alone
//! touches the peer table, the dial book and the store, so there are no locks and every
//! decision (admit or drop a connection, show a line, redial) sees a consistent state. It never
//! waits on a single neighbour: frames are queued with `try_send`, and a neighbour whose queue
//! is full is repaired by the next anti-entropy round instead.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::{Instant, sleep_until};
use tokio_util::task::TaskTracker;

use crate::addr;
use crate::chain::{self, ChainHash};
use crate::config::Config;
use crate::connection::{self, CloseReason, ConnEvent, Context, MAX_HALF_OPEN_PER_IP, Ready, Role};
use crate::console::{self, Input};
use crate::dialbook::{DialBook, Hold};
use crate::flood::{Bucket, Buckets, Verdict};
use crate::frame::{Gone, Hello, Lines, MAX_GOSSIP, Message, PROTOCOL_MAX, PeerInfo};
use crate::handshake::Local;
use crate::hook::{self, Hook};
use crate::id::{PeerId, random_u64};
use crate::identity::{Domain, Identity};
use crate::known::Known;
use crate::linkwatch::{self, AcceptedLinks};
use crate::neighbours::{Admission, ConnId, Link, Neighbour, Table};
use crate::outbox::Budget;
use crate::output::{DownReason, Event, HELP, Output, Sink, msg_id};
use crate::shutdown::Shutdown;
use crate::state::{Restored, StateDir};
use crate::store::{Delivery, Met, Outcome, Received, Store};

/// Most dials in progress at once.
const MAX_DIALS: usize = 16;
/// How long a peer whose connection was closed as a duplicate counts as up without one.
const SWAP_GRACE: Duration = Duration::from_secs(2);
/// A connection that ends sooner than this after it came up counts as a failed dial.
const STABLE: Duration = Duration::from_secs(1);
/// Probes sent in a whole mesh at rest per beat, about: past this many neighbours a peer probes
/// less often than every beat (see `on_probe_tick`).
const PROBES_PER_MESH_BEAT: usize = 128;
/// Connection events handled in one go before the loop looks at its other sources.
const EVENT_BATCH: usize = 256;
/// After a failed accept (out of file descriptors, say), accepting pauses this long.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Neighbours asked at a time to follow a sender this peer no longer hears directly.
const ORPHAN_FANOUT: usize = 2;
/// How often such a request is renewed (to the next neighbours in turn), and how long a
/// neighbour follows a sender for another after a request.
const FOLLOW_RENEW: Duration = Duration::from_secs(5);
const FOLLOW_FOR: Duration = Duration::from_secs(15);
/// How long leaving waits for goodbyes to be flushed.
const LEAVE_FLUSH: Duration = Duration::from_millis(500);
/// Members a neighbour may tell us of at once (a newcomer learns a whole mesh from its first
/// neighbour), and how many a second after that.
const GOSSIP_BURST: f64 = 512.0;
const GOSSIP_RATE: f64 = 32.0;

/// What a peer talks through. It is passed in, as mini-redis passes its listener and shutdown
/// in, so that one program can run many peers (a test, say) with channels for stdin and stdout.
pub struct Io {
    pub listener: TcpListener,
    /// What is typed: lines and commands.
    pub input: mpsc::Receiver<Input>,
    /// Where events go.
    pub output: Sink,
    /// Resolves when the peer is asked to leave.
    pub shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
}

/// Runs a peer on this process's stdin, stdout and signals until it is told to leave.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let bind = SocketAddr::new(cfg.bind, cfg.port);
    let listener = TcpListener::bind(bind).await.with_context(|| format!("cannot listen on {bind}"))?;
    // Installed before the peer says it listens: a signal at any moment after is a goodbye.
    let mut signals = Shutdown::install().context("cannot install signal handlers")?;
    let (typed, input) = mpsc::channel(64);
    let output = if crate::terminal::wanted(cfg.json) {
        Sink::Printer(crate::terminal::open(typed, cfg.lab, "you> ".into())?)
    } else {
        tokio::spawn(console::read_stdin(typed, cfg.lab));
        Sink::stdout(cfg.limits().stdout_bytes)
    };
    let shutdown = Box::pin(async move { signals.requested().await });
    serve(cfg, Io { listener, input, output, shutdown }).await
}

/// Runs a peer on the given IO until it is told to leave.
pub async fn serve(cfg: Config, io: Io) -> anyhow::Result<()> {
    Mesh::new(cfg, io)?.run().await
}

struct Mesh {
    me: PeerId,
    name: String,
    incarnation: u64,
    local: SocketAddr,
    listener: TcpListener,
    input: Option<mpsc::Receiver<Input>>,
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    ctx: Arc<Context>,
    events: mpsc::Receiver<ConnEvent>,
    table: Table,
    book: DialBook,
    store: Store,
    out: Output,
    hook: Option<Hook>,
    permits: Arc<Semaphore>,
    /// Bytes queued towards all neighbours together.
    budget: Arc<Budget>,
    /// How many lines of its own each member may still send.
    lines: Buckets,
    /// How many members each neighbour may still tell us of.
    gossip: Buckets,
    /// Senders not heard directly any more, and until when neighbours follow them for us.
    orphans: HashMap<PeerId, Instant>,
    /// Per sender, the neighbours that asked us to follow it for them, and until when.
    followers: HashMap<PeerId, HashMap<PeerId, Instant>>,
    /// Where the orphan rota stands.
    rota: usize,
    /// Probe ticks so far (the probe rota's pace, see `on_probe_tick`).
    beats: u64,
    /// How often accepted links' counts are read, and how long one may stay quiet; none when
    /// their kernels probe them instead (see crate::linkwatch).
    link_cadence: Option<linkwatch::Cadence>,
    stats: Stats,
    /// Bytes of catch-up this peer may still make, for all neighbours together: neighbours that
    /// ask for everything and never read cannot keep its one thread encoding.
    catch_up: Bucket,
    tasks: TaskTracker,
    next_conn: ConnId,
    last_refusal_warning: Option<Instant>,
    accept_paused_until: Option<Instant>,
    /// When the earliest probed neighbour will have been silent for `--timeout`.
    probe_due: Option<Instant>,
    /// The state directory, with --state-dir.
    state: Option<StateDir>,
    /// Lines and gaps decided but not yet shown: they are shown once the state records them.
    unshown: Vec<Unshown>,
    cfg: Config,
}

/// Something to show, waiting for the state directory to record it.
enum Unshown {
    Line(Delivery),
    Gap { origin: PeerId, missed: u64, upto: u64 },
}

impl Mesh {
    fn new(cfg: Config, io: Io) -> anyhow::Result<Mesh> {
        let now = Instant::now();
        let name = cfg.name();
        let mesh_key = cfg.mesh_key()?;
        let (state, identity, restored) = match &cfg.state_dir {
            Some(dir) => {
                let (state, identity, restored) = StateDir::open(dir)?;
                (Some(state), identity, restored)
            }
            None => (None, Identity::generate(), Restored::default()),
        };
        let me = identity.id();
        let limits = cfg.limits();
        let store = restore(&identity, restored, cfg.retention(), now);
        let (events_tx, events) = mpsc::channel(1024);
        let hook = cfg.lab.then(|| {
            let mut hook = Hook::default();
            for cmd in cfg.lab_cut.iter().chain(&cfg.lab_condition) {
                hook.apply(cmd.clone());
            }
            hook
        });
        let accepted_links = AcceptedLinks::choose(cfg.timeout, cfg.max_conns, linkwatch::open_file_limit());
        let ctx = Arc::new(Context {
            events: events_tx,
            source: Some(cfg.bind).filter(|ip| !ip.is_unspecified()),
            local: Local { identity, mesh_key },
            reported: Default::default(),
            half_open: Default::default(),
            traffic: Default::default(),
            timeout: cfg.timeout,
            accepted_links,
            handshake_timeout: cfg.handshake_timeout,
            connect_timeout: cfg.connect_timeout,
            conditions: hook.as_ref().map(Hook::conditions),
        });
        let mut book = DialBook::new(cfg.schedule());
        for b in &cfg.bootstrap {
            book.add_bootstrap(b, now);
        }
        Ok(Mesh {
            store,
            me,
            name,
            incarnation: random_u64(),
            local: io.listener.local_addr()?,
            listener: io.listener,
            input: Some(io.input),
            shutdown: io.shutdown,
            ctx,
            events,
            table: Table::default(),
            book,
            out: Output::new(cfg.json, io.output),
            hook,
            permits: Arc::new(Semaphore::new(cfg.max_conns as usize)),
            budget: Budget::new(limits.queued_bytes),
            lines: Buckets::new(cfg.line_rate, cfg.line_burst),
            gossip: Buckets::new(GOSSIP_RATE, GOSSIP_BURST),
            orphans: HashMap::new(),
            followers: HashMap::new(),
            rota: 0,
            beats: 0,
            link_cadence: (accepted_links == AcceptedLinks::Counted).then(|| linkwatch::Cadence::of(cfg.timeout)),
            stats: Stats::default(),
            catch_up: Bucket::new(limits.catch_up_rate as f64, limits.catch_up_rate as f64, now),
            tasks: TaskTracker::new(),
            next_conn: 0,
            last_refusal_warning: None,
            accept_paused_until: None,
            probe_due: None,
            state,
            unshown: Vec::new(),
            cfg,
        })
    }

    fn identity(&self) -> &Identity {
        &self.ctx.local.identity
    }

    async fn run(mut self) -> anyhow::Result<()> {
        self.out.emit(&Event::Listening {
            id: &self.me,
            name: &self.name,
            addr: self.local.to_string(),
            advertise: self.cfg.advertise.as_deref(),
            protocol: PROTOCOL_MAX,
            events: crate::output::EVENTS_VERSION,
            security: self.ctx.local.security(),
        });
        if self.ctx.local.mesh_key.is_none() {
            self.out.notice(
                "* open mesh: anyone who can reach this peer can join and read the chat (--key-file or MESH_KEY makes it private)",
            );
        }
        if let Some(hook) = &self.hook {
            self.out.emit(&Event::Hook { cuts: hook.table(), conditions: hook.condition_table() });
        }
        let mut stdin = self.input.take().expect("taken once");
        let mut stdin_open = true;
        let mut sync = tokio::time::interval(self.cfg.sync_interval);
        let mut probe = tokio::time::interval(self.cfg.heartbeat);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Polled only when accepted links are counted: with their kernels probing them there is
        // nothing to read, and no wake-up.
        let mut watch = tokio::time::interval(self.link_cadence.map_or(Duration::from_secs(1), |c| c.turn));
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.dial_due();
            let now = Instant::now();
            if self.probe_due.is_some_and(|t| t <= now) {
                self.drop_silent(now);
            }
            let accepting = self.accept_paused_until.is_none_or(|t| t <= now);
            let wake = self.next_wake(now);
            tokio::select! {
                Some(event) = self.events.recv() => {
                    self.on_conn_event(event);
                    for _ in 0..EVENT_BATCH {
                        match self.events.try_recv() {
                            Ok(event) => self.on_conn_event(event),
                            Err(_) => break,
                        }
                    }
                }
                input = stdin.recv(), if stdin_open => match input {
                    Some(input) => {
                        let mut batch = vec![input];
                        while batch.len() < EVENT_BATCH {
                            match stdin.try_recv() {
                                Ok(input) => batch.push(input),
                                Err(_) => break,
                            }
                        }
                        if self.on_inputs(batch) == Flow::Quit {
                            break;
                        }
                    }
                    None => stdin_open = false,
                },
                accepted = self.listener.accept(), if accepting => self.on_accept(accepted),
                _ = sync.tick() => self.on_tick(),
                _ = probe.tick() => self.on_probe_tick(Instant::now()),
                // The tick's own time, not the handler's: readings then lie exactly a turn
                // apart, and a limit of whole turns is not missed by a microsecond.
                at = watch.tick(), if self.link_cadence.is_some() => self.end_quiet_links(at),
                _ = sleep_until(wake) => {}
                _ = &mut self.shutdown => break,
            }
            self.commit();
        }
        self.commit();
        self.leave().await;
        Ok(())
    }

    fn on_conn_event(&mut self, event: ConnEvent) {
        match event {
            ConnEvent::Ready(ready) => self.on_ready(*ready),
            ConnEvent::Received { conn, msg } => self.on_message(conn, msg),
            ConnEvent::Closed { conn, reason } => self.on_closed(conn, reason),
            ConnEvent::DialFailed { target, unresolved, error } => {
                if self.book.failed(&target, unresolved, Instant::now()) {
                    tracing::warn!("cannot resolve {target} ({error}); retrying in the background");
                } else {
                    tracing::debug!("dial to {target} failed: {error}");
                }
            }
        }
    }

    /// Our hello for a new connection: who we are, where our chain stands, whom we know.
    fn hello(&self) -> Hello {
        let mut known: Vec<PeerId> = self.table.iter().map(|n| n.info.id).collect();
        known.extend(self.book.known_ids().copied());
        known.sort_unstable();
        known.dedup();
        Hello {
            id: self.me,
            incarnation: self.incarnation,
            name: self.name.clone(),
            port: self.local.port(),
            advertise: self.cfg.advertise.clone(),
            seq: self.store.my_seq(),
            head: self.store.my_head(),
            known: Known::of(known.iter()),
        }
    }

    fn is_cut(&self, name: &str) -> bool {
        self.hook.as_ref().is_some_and(|h| h.cut(name).is_some())
    }

    fn on_ready(&mut self, r: Ready) {
        let now = Instant::now();
        let e = r.established;
        let h = e.hello;
        let target = match r.role {
            Role::Dialer { target } => Some(target),
            Role::Acceptor(_) => None,
        };
        if h.id == self.me {
            if let Some(t) = &target {
                tracing::warn!("ignoring {t}: it is this peer's own address");
                self.book.is_self(t);
            }
            return;
        }
        if let Some(why) = self.not_admitted(&h, r.observed.ip(), now) {
            tracing::debug!(peer = %h.id.short(), "not admitted: {why}");
            if let Some(t) = &target {
                self.book.failed(t, false, now);
            }
            return;
        }
        self.book.met(&h.id);
        if let Some(t) = &target {
            self.book.connected(t, &h.id);
        }
        let info = PeerInfo {
            id: h.id,
            name: h.name.clone(),
            addr: h.advertise.clone().unwrap_or_else(|| addr::dialable(r.observed.ip(), h.port)),
        };
        let link = match target {
            Some(_) => Link { dialer: self.me, nonce: e.our_nonce },
            None => Link { dialer: h.id, nonce: e.their_nonce },
        };
        let neighbour = Neighbour {
            info: info.clone(),
            key: e.key,
            conn: r.conn,
            outbox: r.outbox,
            incarnation: h.incarnation,
            link,
            superseded: false,
            leaving: false,
            lagging: false,
            last_heard: now,
            probe: None,
            suspected_at: None,
            up_since: now,
            host: addr::host_of(r.observed.ip()),
            stranger: !self.store.knows(&h.id),
            watch: r.watch,
        };
        let announce = match self.table.admit(neighbour) {
            Admission::Rejected(loser) => return close_as_duplicate(loser),
            Admission::Replaced(loser) => {
                close_as_duplicate(loser);
                false
            }
            Admission::Restarted(old) => {
                self.out.emit(&Event::PeerDown { peer: &old.info, reason: DownReason::Closed });
                true
            }
            Admission::Resumed => false,
            Admission::New => true,
        };
        let table = &self.table;
        let met = Met { info: &info, seq: h.seq, head: h.head, key: e.key, host: r.observed.ip() };
        if self.store.meet(met, |id| table.is_up(id), now) {
            self.record_met(&info.id);
        }
        if announce {
            self.out.emit(&Event::PeerUp { peer: &info, seq: h.seq, protocol: e.version });
        }
        self.stats.admitted += 1;
        // Heard directly again.
        self.orphans.remove(&info.id);
        self.tell_members(&info.id, &h.known);
        self.send_digest(&h.id);
    }

    /// Why a connection that completed its handshake is not admitted, if it is not: the lab
    /// hook cuts it, it is held off, its host has too many connections, or it is a stranger and
    /// the slots left are kept for known members.
    fn not_admitted(&self, h: &Hello, ip: IpAddr, now: Instant) -> Option<String> {
        if self.is_cut(&h.name) {
            return Some("cut off by the lab hook".into());
        }
        if let Some(hold @ (Hold::Flooded | Hold::Forged)) = self.book.hold_of(&h.id, now) {
            return Some(format!("held off ({hold:?})"));
        }
        if self.table.is_up(&h.id) {
            return None; // a second connection of a neighbour: the pair rule picks one
        }
        let host = addr::host_of(ip);
        let on_host = self.table.iter().filter(|n| n.host == host).count();
        if on_host >= self.cfg.max_conns_per_host as usize {
            return self.refusal(format!("{on_host} connections from its host (--max-conns-per-host)"), now);
        }
        let strangers = self.table.iter().filter(|n| n.stranger).count();
        let stranger_slots = self.cfg.max_conns as usize - self.cfg.max_conns as usize / 4;
        if !self.store.knows(&h.id) && strangers >= stranger_slots {
            return self
                .refusal(format!("{strangers} strangers connected: the other slots are kept for known members"), now);
        }
        None
    }

    /// A refusal after the handshake: logged at most every 5 s.
    fn refusal(&self, why: String, now: Instant) -> Option<String> {
        if self.last_refusal_warning.is_none_or(|t| now.duration_since(t) > Duration::from_secs(5)) {
            tracing::warn!("refusing a connection: {why}");
        }
        Some(why)
    }

    /// Tells a newly admitted neighbour of every member we know that its filter lacks.
    fn tell_members(&mut self, to: &PeerId, known: &Known) {
        let theirs = known.reader();
        let lacking: Vec<PeerInfo> = self
            .table
            .iter()
            .filter(|n| n.info.id != *to && !theirs.contains(&n.info.id))
            .map(|n| n.info.clone())
            .collect();
        if let Some(n) = self.table.get_mut(to) {
            for chunk in lacking.chunks(MAX_GOSSIP) {
                n.send(Message::Peers { peers: chunk.to_vec() }.encode());
            }
        }
    }

    /// A member told us of `p`: dial it at once unless already connected. (Members told of a
    /// newcomer are not told of it in turn: the newcomer dials them, so there is no race to
    /// avoid by letting one side wait; two sides told of each other by one bridge may both dial,
    /// and the pair rule keeps one connection.)
    fn consider(&mut self, p: &PeerInfo, now: Instant) {
        if p.id == self.me || self.table.is_up(&p.id) || self.is_cut(&p.name) {
            return;
        }
        self.book.learn(&p.addr, &p.id, true, now);
    }

    fn on_message(&mut self, conn: ConnId, msg: Message) {
        let now = Instant::now();
        let Some(n) = self.table.by_conn_mut(conn) else { return };
        n.last_heard = now;
        if n.probe.take().is_some() && self.table.iter().all(|m| m.probe.is_none()) {
            self.probe_due = None; // no wake-up for a probe that was answered
        }
        let Some(n) = self.table.by_conn_mut(conn) else { return };
        let from = n.info.id;
        match msg {
            Message::Dup => n.superseded = true,
            Message::Goodbye { sig } => {
                if n.key.verify(Domain::Goodbye, &[&n.incarnation.to_be_bytes()], &sig) {
                    n.leaving = true;
                } else {
                    tracing::warn!("ignoring a goodbye from {} that its key did not sign", n.info.name);
                }
            }
            Message::Peers { peers } => {
                let gossip = self.gossip.of(&from, now);
                let (allowed, _) = gossip.take(now, peers.len() as u64, false);
                let allowed = allowed as usize;
                if allowed < peers.len() {
                    tracing::debug!(peer = %from.short(), "it tells of members faster than allowed: {} ignored", peers.len() - allowed);
                }
                for p in &peers[..allowed] {
                    self.consider(p, now);
                }
            }
            Message::Lines(batch) => self.on_lines(conn, from, batch, now),
            Message::Notice { text, sig } => {
                if n.key.verify(Domain::Notice, &[self.me.as_bytes(), text.as_bytes()], &sig) {
                    let from = n.info.clone();
                    self.out.emit(&Event::Notice { from: &from, text: &text });
                }
            }
            Message::Digest { have, follow } => {
                self.follow(from, &follow, now);
                self.answer_digest(&from, &have);
            }
            Message::Gone(gone) => self.on_gone(from, gone, now),
            Message::Ping { seq } => {
                n.send(Message::Pong { seq: self.store.my_seq() }.encode());
                self.heard_of(conn, from, seq);
            }
            Message::Pong { seq } => self.heard_of(conn, from, seq),
            Message::Suspect { id } => self.on_suspect(&from, id, now),
            Message::Hello(_) | Message::Auth { .. } | Message::Refuse { .. } => {}
        }
    }

    /// Lines from neighbour `from`: its own are shown as fast as its flood limit allows (the
    /// rest are refused for now and caught up later); relayed ones as they check out.
    fn on_lines(&mut self, conn: ConnId, from: PeerId, batch: Lines, now: Instant) {
        let mut room = usize::MAX;
        if batch.origin == from {
            let new = batch.last().saturating_sub(self.store.mark(&from).map_or(0, |(m, _)| m));
            let bucket = self.lines.of(&from, now);
            let (taken, verdict) = bucket.take(now, new.min(batch.lines.len() as u64), !batch.catch_up);
            room = taken as usize;
            if let Verdict::Refuse { first, flooding } = verdict {
                self.refuse_lines(conn, first, flooding);
                if room == 0 || self.table.by_conn_mut(conn).is_none() {
                    return;
                }
            }
        }
        let r = self.store.receive(batch, from, room, now);
        if r.outcome == Outcome::Ignored || r.cut_short {
            self.needs_digest_round(conn);
        }
        self.received(r, now);
    }

    fn on_gone(&mut self, from: PeerId, gone: Gone, now: Instant) {
        let origin = gone.origin;
        let upto = gone.upto;
        match self.store.skip(gone, now) {
            Ok(Some((missed, r))) => {
                tracing::debug!(origin = %origin.short(), upto, via = %from.short(), "lines gone");
                self.unshown.push(Unshown::Gap { origin, missed, upto });
                self.received(r, now);
            }
            Ok(None) => {}
            Err(_) => self.forged(&from, now),
        }
    }

    /// Shows what arrived, passes it on to followers of its sender, and deals with neighbours
    /// that relayed forgeries.
    fn received(&mut self, r: Received, now: Instant) {
        let mut shown: Vec<(PeerId, u64, PeerId)> = Vec::new();
        for d in &r.delivered {
            if !shown.iter().any(|(o, _, _)| *o == d.line.origin) {
                shown.push((d.line.origin, d.line.seq, d.via));
            }
        }
        if !self.followers.is_empty() {
            self.pass_on(&shown, now);
        }
        self.unshown.extend(r.delivered.into_iter().map(Unshown::Line));
        for via in r.forged_by {
            self.forged(&via, now);
        }
    }

    /// A neighbour said (in a probe) that it has said lines up to `seq`: if we lack some, a
    /// digest round with it at the next tick brings them.
    fn heard_of(&mut self, conn: ConnId, from: PeerId, seq: u64) {
        self.store.note_latest(&from, seq);
        if self.store.mark(&from).is_some_and(|(mark, _)| mark < seq) {
            self.needs_digest_round(conn);
        }
    }

    /// A neighbour relayed lines or a gone statement their sender did not sign: it is
    /// disconnected and held off.
    fn forged(&mut self, via: &PeerId, now: Instant) {
        let Some(n) = self.table.get_mut(via) else { return };
        tracing::warn!(
            "closing connection to {}@{}: it sent lines (or a gone statement) their sender did not sign",
            n.info.name,
            n.info.addr
        );
        let conn = n.conn;
        self.drop_neighbour(conn, DownReason::Closed, Some(Hold::Forged), now);
    }

    /// Closes a neighbour's connection from this side: it is reported down with `reason`, and
    /// either held off (`hold`) or redialled like any neighbour lost.
    fn drop_neighbour(&mut self, conn: ConnId, reason: DownReason, hold: Option<Hold>, now: Instant) {
        let Some(n) = self.table.remove_conn(conn) else { return };
        self.out.emit(&Event::PeerDown { peer: &n.info, reason });
        match hold {
            Some(hold) => self.book.left(&n.info.id, hold, now),
            None => {
                self.orphans.entry(n.info.id).or_insert(now);
                self.book.lost(&n.info.id, &n.info.addr, self.me < n.info.id, true, now);
            }
        }
        if self.table.is_empty() {
            self.book.isolated(now);
        }
    }

    /// A neighbour sent lines of its own over its rate: they are dropped for now (anti-entropy
    /// brings them back later, at the allowed pace); the neighbour is told, and if it floods it
    /// is disconnected and held off (neither dialled nor admitted) for a while.
    fn refuse_lines(&mut self, conn: ConnId, first: bool, flooding: bool) {
        self.needs_digest_round(conn);
        let rate = self.cfg.line_rate;
        let Some(n) = self.table.by_conn_mut(conn) else { return };
        if first {
            let text = format!(
                "you send lines faster than {rate} a second: the excess is refused and will be caught up later"
            );
            let sig = self.ctx.local.identity.sign(Domain::Notice, &[n.info.id.as_bytes(), text.as_bytes()]);
            n.send(Message::Notice { text, sig }.encode());
        }
        if flooding {
            tracing::warn!(
                "closing connection to {}@{}: it floods lines over the rate limit",
                n.info.name,
                n.info.addr
            );
            if let Some(n) = self.table.remove_conn(conn) {
                self.out.emit(&Event::PeerDown { peer: &n.info, reason: DownReason::Closed });
                self.book.left(&n.info.id, Hold::Flooded, Instant::now());
            }
        }
    }

    /// A line from this neighbour was dropped (over its rate, or too far ahead): exchange digests
    /// at the next tick even if nothing changed here, or neither side would ask for it again.
    fn needs_digest_round(&mut self, conn: ConnId) {
        if let Some(n) = self.table.by_conn_mut(conn) {
            n.mark_lagging();
        }
    }

    /// Records the starting watermark of a sender met for the first time, before its `peer_up`
    /// is printed: after a crash and a restart, the lines it said since are still owed.
    fn record_met(&mut self, id: &PeerId) {
        let (Some(state), Some(mark)) = (&mut self.state, self.store.mark(id)) else { return };
        if let Err(e) = state.marks([(*id, mark)].into()).and_then(|_| state.sync()) {
            tracing::error!("cannot write the state directory: {e}");
        }
    }

    /// Shows what was decided since the last commit. With a state directory, the watermarks
    /// these lines move are written to the journal first (a write survives a kill), then the
    /// lines are printed on this thread, then the journal is made durable: a line is never shown
    /// twice, even across crashes; a kill between the two writes leaves a line recorded as shown
    /// that was not printed.
    fn commit(&mut self) {
        if self.unshown.is_empty() {
            return;
        }
        let unshown = std::mem::take(&mut self.unshown);
        let infos: Vec<PeerInfo> = unshown
            .iter()
            .map(|u| match u {
                Unshown::Line(d) => self.store.info(&d.line.origin),
                Unshown::Gap { origin, .. } => self.store.info(origin),
            })
            .collect();
        let events: Vec<Event> = unshown
            .iter()
            .zip(&infos)
            .map(|(u, from)| match u {
                Unshown::Line(d) => Event::Message {
                    msg_id: msg_id(&d.line.origin, d.line.seq),
                    seq: d.line.seq,
                    from,
                    via: &d.via,
                    text: &d.line.text,
                    sent_at_ms: d.line.sent_at_ms,
                    caught_up: d.caught_up,
                },
                Unshown::Gap { missed, upto, .. } => Event::Gap { from, missed: *missed, upto: *upto },
            })
            .collect();
        let Some(state) = &mut self.state else {
            for e in &events {
                self.out.emit(e);
            }
            return;
        };
        let moved: BTreeMap<PeerId, (u64, ChainHash)> =
            infos.iter().filter_map(|p| Some((p.id, self.store.mark(&p.id)?))).collect();
        if let Err(e) = state.marks(moved).and_then(|_| state.flush()) {
            tracing::error!("cannot write the state directory: {e}");
        }
        self.out.emit_now(&events);
        if let Err(e) = state.sync() {
            tracing::error!("cannot write the state directory: {e}");
        }
        if state.wants_compaction()
            && let Err(e) = state.compact(&self.store.own_lines(), self.store.own_floor(), &self.store.marks())
        {
            tracing::error!("cannot compact the state directory: {e}");
        }
    }

    /// Sends a neighbour what its digest says it lacks (as much as its queue has room for; the
    /// rest in later rounds), and our digest if it has more.
    fn answer_digest(&mut self, from: &PeerId, have: &BTreeMap<PeerId, u64>) {
        let now = Instant::now();
        let Some(room) = self.table.get_mut(from).map(|n| n.outbox.catch_up_room()) else { return };
        let room = room.min(self.catch_up.available(now) as usize);
        let identity = self.ctx.local.identity.clone();
        let catch_up = self.store.catch_up_for(from, have, room, &identity);
        self.catch_up.take(now, catch_up.bytes as u64, false);
        for forger in &catch_up.forged_by {
            self.forged(forger, Instant::now());
        }
        let Some(n) = self.table.get_mut(from) else { return };
        for m in catch_up.messages {
            n.send(m.encode());
        }
        if catch_up.truncated {
            n.mark_lagging();
        }
        if catch_up.they_are_ahead {
            self.send_digest(from);
        }
    }

    /// Sends a neighbour our digest: where we stand with every sender known to have said
    /// something (none at all: nothing to send).
    fn send_digest(&mut self, to: &PeerId) {
        let digests = self.store.digests(Instant::now(), None);
        if let Some(n) = self.table.get_mut(to) {
            for d in &digests {
                n.send(d.encode());
            }
        }
    }

    fn on_closed(&mut self, conn: ConnId, reason: CloseReason) {
        let now = Instant::now();
        let Some(n) = self.table.remove_conn(conn) else { return };
        let id = n.info.id;
        if n.leaving {
            self.out.emit(&Event::PeerDown { peer: &n.info, reason: DownReason::Goodbye });
            self.book.left(&id, Hold::Left, now);
            self.orphans.remove(&id);
        } else if n.superseded {
            self.table.hold_for_swap(n, now + SWAP_GRACE);
            return;
        } else {
            let reason = match reason {
                CloseReason::Timeout if self.is_cut(&n.info.name) => DownReason::Cut,
                CloseReason::Timeout => DownReason::Timeout,
                CloseReason::Closed | CloseReason::Violation | CloseReason::Local => DownReason::Closed,
            };
            self.out.emit(&Event::PeerDown { peer: &n.info, reason });
            let stable = now.duration_since(n.up_since) >= STABLE;
            self.book.lost(&id, &n.info.addr, self.me < id, stable, now);
            self.orphans.entry(id).or_insert(now);
        }
        if self.table.is_empty() {
            self.book.isolated(now);
        }
    }

    /// Handles a batch of stdin inputs in order; consecutive lines are said together (one
    /// write to the state directory and one signature for all of them).
    fn on_inputs(&mut self, inputs: Vec<Input>) -> Flow {
        let mut lines = Vec::new();
        for input in inputs {
            if let Input::Say(text) = input {
                lines.push(text);
                continue;
            }
            self.say(std::mem::take(&mut lines));
            match input {
                Input::Peers => self.out.emit(&Event::Peers { peers: &self.table.infos() }),
                Input::Stats => self.emit_stats(),
                Input::Help => self.out.emit(&Event::Help { text: HELP }),
                Input::Lab(cmd) => self.apply_lab(cmd),
                Input::Rejected(message) => self.out.emit(&Event::Error { message }),
                Input::Quit => return Flow::Quit,
                Input::Say(_) => unreachable!("handled above"),
            }
        }
        self.say(lines);
        Flow::Continue
    }

    /// Says lines: signed in batches, recorded in the state directory first (if any), then
    /// acknowledged (`sent`) and sent to every neighbour. Nothing leaves this peer before it is
    /// recorded, so a restart never reuses a sequence number another peer has seen.
    fn say(&mut self, texts: Vec<String>) {
        if texts.is_empty() {
            return;
        }
        let batches = self.store.compose(self.identity(), &self.name, texts, unix_ms());
        if let Some(state) = &mut self.state {
            let lines = batches.iter().flat_map(|b| &b.lines);
            let written = lines.clone().try_for_each(|l| state.said(l)).and_then(|_| state.sync());
            if let Err(e) = written {
                tracing::error!("cannot write the state directory: {e}");
                let message = format!("cannot record {} lines in the state directory ({e}): not sent", lines.count());
                self.out.emit(&Event::Error { message });
                return;
            }
        }
        let now = Instant::now();
        let queued = self.table.is_empty();
        for batch in batches {
            let sent = self.store.said(batch, now);
            for line in &sent.lines {
                let msg_id = msg_id(&self.me, line.seq);
                self.out.emit(&Event::Sent { msg_id, seq: line.seq, text: &line.text, queued });
            }
            let frame = Message::Lines(sent).encode();
            for n in self.table.iter_mut() {
                n.send(frame.clone());
            }
        }
    }

    /// Applies a lab hook command: a neighbour now cut (either way) is disconnected at once, and
    /// its connections are refused after their handshake until healed; a condition takes hold
    /// in the connections' writers at their next frame.
    fn apply_lab(&mut self, cmd: hook::LabCommand) {
        let Some(hook) = self.hook.as_mut() else { return };
        hook.apply(cmd);
        let table = hook.table();
        let conditions = hook.condition_table();
        let cut: Vec<ConnId> = self.table.iter().filter(|n| table.contains_key(&n.info.name)).map(|n| n.conn).collect();
        for conn in cut {
            self.drop_neighbour(conn, DownReason::Cut, None, Instant::now());
        }
        self.out.emit(&Event::Hook { cuts: table, conditions });
    }

    /// Probes the neighbour heard from least lately (among those quiet for `--timeout` plus a second), and
    /// gives up on those that left a probe unanswered for `--timeout`: a frozen peer, whose
    /// kernel still keeps its connections up, is noticed here (a cut is noticed by the kernel,
    /// see crate::connection). Each peer probes
    /// one neighbour per `--heartbeat`, or with more than 128 neighbours one every n/128 beats:
    /// a mesh at rest sends at most about 128 probes a beat in all, and a frozen peer is probed
    /// by someone about every beat up to 128 peers (every two at 256). Whoever finds it silent
    /// tells the others (`suspect`), who probe it at once.
    fn on_probe_tick(&mut self, now: Instant) {
        if self.probe_due.is_some_and(|t| t <= now) {
            self.drop_silent(now);
        }
        self.beats += 1;
        let every = self.table.len().div_ceil(PROBES_PER_MESH_BEAT).max(1) as u64;
        if !self.beats.is_multiple_of(every) {
            return;
        }
        // Only links quiet for the timeout and a second more: every link is watched for cuts
        // (the kernel's probes, or on an accepted link its count of segments, see
        // crate::linkwatch), which has ended one cut that long ago, while a probe sent into a
        // link cut moments ago would hold that verdict back until the probe itself timed out
        // (twice the timeout).
        let quiet_for = self.cfg.timeout + Duration::from_secs(1);
        let quietest = self
            .table
            .iter()
            .filter(|n| n.probe.is_none() && now.duration_since(n.last_heard) >= quiet_for)
            .min_by_key(|n| n.last_heard)
            .map(|n| n.info.id);
        if let Some(id) = quietest {
            self.probe(&id, now);
        }
    }

    /// Sends a neighbour a probe, unless one is out already.
    fn probe(&mut self, id: &PeerId, now: Instant) {
        let seq = self.store.my_seq();
        if let Some(n) = self.table.get_mut(id).filter(|n| n.probe.is_none()) {
            n.send(Message::Ping { seq }.encode());
            n.probe = Some(now);
            let due = now + self.cfg.timeout;
            self.probe_due = Some(self.probe_due.map_or(due, |t| t.min(due)));
        }
    }

    /// Drops the probed neighbours that did not answer in time, telling the others to probe
    /// them too.
    fn drop_silent(&mut self, now: Instant) {
        let within = self.cfg.timeout;
        let silent: Vec<(ConnId, PeerId, bool)> = self
            .table
            .iter()
            .filter(|n| n.probe.is_some_and(|t| now.duration_since(t) >= within))
            .map(|n| (n.conn, n.info.id, self.is_cut(&n.info.name)))
            .collect();
        for (conn, id, cut) in silent {
            let reason = if cut { DownReason::Cut } else { DownReason::Timeout };
            self.drop_neighbour(conn, reason, None, now);
            let word = Message::Suspect { id }.encode();
            for n in self.table.iter_mut() {
                n.send(word.clone());
            }
        }
        self.probe_due = self.table.iter().filter_map(|n| n.probe).min().map(|t| t + within);
    }

    /// Ends the accepted links on which nothing arrived for their quiet limit, as the kernel ends
    /// a dialled link whose probes go unanswered: a silent cut (see crate::linkwatch::Cadence).
    fn end_quiet_links(&mut self, now: Instant) {
        let Some(limit) = self.link_cadence.map(|c| c.quiet_limit) else { return };
        let quiet: Vec<ConnId> = self
            .table
            .iter_mut()
            .filter_map(|n| n.watch.as_mut().is_some_and(|w| w.quiet_for(limit, now)).then_some(n.conn))
            .collect();
        for conn in quiet {
            self.on_closed(conn, CloseReason::Timeout);
        }
    }

    /// A neighbour found `id` silent: probe it now, unless it spoke lately. (Advice: at worst
    /// one probe; a neighbour's word is taken at most once a beat.)
    fn on_suspect(&mut self, from: &PeerId, id: PeerId, now: Instant) {
        let beat = self.cfg.heartbeat;
        let Some(n) = self.table.get_mut(from) else { return };
        if n.suspected_at.is_some_and(|t| now.duration_since(t) < beat) {
            return;
        }
        n.suspected_at = Some(now);
        if self.table.get_mut(&id).is_some_and(|m| now.duration_since(m.last_heard) >= beat) {
            self.probe(&id, now);
        }
    }

    fn emit_stats(&mut self) {
        let t = &self.ctx.traffic;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        self.out.emit(&Event::Stats {
            neighbours: self.table.len(),
            dials: self.stats.dials,
            accepted: self.stats.accepted,
            admitted: self.stats.admitted,
            frames_in: load(&t.frames_in),
            bytes_in: load(&t.bytes_in),
            frames_out: load(&t.frames_out),
            bytes_out: load(&t.bytes_out),
        });
    }

    /// When the loop must wake up on its own: the next due dial (unless the dial limit is
    /// reached: a finishing dial wakes it anyway), the end of an accept pause, or a probed
    /// neighbour's timeout.
    fn next_wake(&self, now: Instant) -> Instant {
        let far = now + Duration::from_secs(3600);
        let dial = if self.book.in_flight() >= MAX_DIALS { None } else { self.book.next_due() };
        let resume = self.accept_paused_until.filter(|t| *t > now);
        dial.into_iter().chain(resume).chain(self.probe_due).min().unwrap_or(far)
    }

    fn on_accept(&mut self, accepted: std::io::Result<(tokio::net::TcpStream, SocketAddr)>) {
        let (stream, from) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: pause accepting rather than spin.
                tracing::warn!("accept failed: {e}");
                self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                return;
            }
        };
        // Some connection slots are kept for our own dials, so that a flood of incoming
        // connections cannot keep this peer from reaching the members.
        let reserved = MAX_DIALS.min(self.cfg.max_conns as usize / 2);
        let permit = match self.permits.available_permits() > reserved {
            true => self.permits.clone().try_acquire_owned().ok(),
            false => None,
        };
        let Some(permit) = permit else {
            let why = format!("{} connections open (--max-conns)", self.cfg.max_conns);
            return self.refuse_connection(from, why);
        };
        let Some(half_open) = self.ctx.half_open.enter(from.ip()) else {
            let why = format!("{MAX_HALF_OPEN_PER_IP} connections from its host are still in their handshake");
            return self.refuse_connection(from, why);
        };
        let conn = self.next_conn();
        let ctx = self.ctx.clone();
        let hello = self.hello();
        let budget = self.budget.clone();
        self.stats.accepted += 1;
        self.tasks.spawn(async move {
            connection::run(stream, Role::Acceptor(half_open), hello, conn, ctx, budget).await;
            drop(permit);
        });
    }

    /// Closes a connection just accepted, with a warning at most every 5 s.
    fn refuse_connection(&mut self, from: SocketAddr, why: String) {
        let now = Instant::now();
        if self.last_refusal_warning.is_none_or(|t| now.duration_since(t) > Duration::from_secs(5)) {
            tracing::warn!("refusing connection from {from}: {why}");
            self.last_refusal_warning = Some(now);
        }
    }

    fn dial_due(&mut self) {
        let room = MAX_DIALS.saturating_sub(self.book.in_flight());
        if room == 0 {
            return;
        }
        let now = Instant::now();
        let table = &self.table;
        let due = self.book.due(now, room, |id| table.is_up(id));
        if due.is_empty() {
            return;
        }
        let hello = self.hello();
        for target in due {
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                self.book.failed(&target, false, now);
                continue;
            };
            let conn = self.next_conn();
            let ctx = self.ctx.clone();
            let hello = hello.clone();
            self.stats.dials += 1;
            let budget = self.budget.clone();
            self.tasks.spawn(async move {
                connection::dial(target, hello, conn, ctx, budget).await;
                drop(permit);
            });
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        self.store.expire(now);
        self.book.expire(now);
        for info in self.table.expired_swaps(now) {
            self.out.emit(&Event::PeerDown { peer: &info, reason: DownReason::Closed });
            self.book.lost(&info.id, &info.addr, self.me < info.id, true, now);
        }
        if self.table.is_empty() {
            self.book.isolated(now);
        }
        // Only after some neighbour was marked: no walk over 255 of them every tick.
        let lagging: Vec<PeerId> = if self.budget.take_lagging() {
            self.table.iter().filter(|n| n.lagging).map(|n| n.info.id).collect()
        } else {
            Vec::new()
        };
        for id in lagging {
            if let Some(n) = self.table.get_mut(&id) {
                n.lagging = false;
            }
            self.send_digest(&id);
        }
        self.followers.retain(|_, f| {
            f.retain(|_, until| *until > now);
            !f.is_empty()
        });
        self.ask_about_orphans(now);
    }

    /// Senders this peer no longer hears directly (their link went down without a goodbye) may
    /// still speak through others: it asks two neighbours at a time, in turn, to follow each
    /// of them (pass their new lines on) for a while, renewing the request before it lapses, with
    /// a digest that also brings what it missed. Nothing at all while every sender is heard
    /// directly, however large the mesh.
    fn ask_about_orphans(&mut self, now: Instant) {
        let age = self.cfg.history_age;
        self.orphans.retain(|id, _| self.store.active_within(id, age, now));
        let neighbours = self.table.len();
        let wanted: Vec<PeerId> = self.orphans.iter().filter(|(_, until)| **until <= now).map(|(id, _)| *id).collect();
        if wanted.is_empty() || neighbours == 0 {
            return;
        }
        // One digest per MAX_FOLLOW senders: what this peer holds of them, and the request.
        let frames: Vec<bytes::Bytes> = wanted
            .chunks(crate::frame::MAX_FOLLOW)
            .map(|ids| {
                let have = self.store.digests(now, Some(ids)).into_iter().find_map(|d| match d {
                    Message::Digest { have, .. } => Some(have),
                    _ => None,
                });
                Message::Digest { have: have.unwrap_or_default(), follow: ids.to_vec() }.encode()
            })
            .collect();
        for _ in 0..ORPHAN_FANOUT.min(neighbours) {
            self.rota = (self.rota + 1) % neighbours;
            let Some(n) = self.table.iter_mut().nth(self.rota) else { break };
            for f in &frames {
                n.send(f.clone());
            }
        }
        for id in wanted {
            self.orphans.insert(id, now + FOLLOW_RENEW);
        }
    }

    /// A neighbour asks us to follow these senders for it: their new lines go to it as they
    /// come, for [`FOLLOW_FOR`].
    fn follow(&mut self, follower: PeerId, senders: &[PeerId], now: Instant) {
        let known = senders.iter().filter(|s| **s != follower && **s != self.me && self.store.knows(s));
        for sender in known.copied().collect::<Vec<_>>() {
            self.followers.entry(sender).or_default().insert(follower, now + FOLLOW_FOR);
        }
    }

    /// Passes lines just shown here on to the neighbours that follow their sender.
    fn pass_on(&mut self, shown: &[(PeerId, u64, PeerId)], now: Instant) {
        for (origin, first, via) in shown {
            let Some(followers) = self.followers.get_mut(origin) else { continue };
            followers.retain(|_, until| *until > now);
            let to: Vec<PeerId> = followers.keys().filter(|f| *f != via).copied().collect();
            for f in to {
                let Some(room) = self.table.get_mut(&f).map(|n| n.outbox.catch_up_room()) else { continue };
                let out = self.store.lines_from(origin, *first, room);
                if let Some(n) = self.table.get_mut(&f) {
                    for m in out.messages {
                        n.send(m.encode());
                    }
                    if out.truncated {
                        n.mark_lagging();
                    }
                }
            }
        }
    }

    fn next_conn(&mut self) -> ConnId {
        self.next_conn += 1;
        self.next_conn
    }

    /// Says goodbye to every neighbour (signed: nobody else can say it for us) and waits
    /// (briefly) for the goodbyes to go out.
    async fn leave(mut self) {
        let sig = self.identity().sign(Domain::Goodbye, &[&self.incarnation.to_be_bytes()]);
        let bye = Message::Goodbye { sig }.encode();
        for mut n in self.table.drain() {
            n.send(bye.clone());
        }
        self.events.close();
        self.tasks.close();
        let _ = tokio::time::timeout(LEAVE_FLUSH, self.tasks.wait()).await;
        self.out.close(LEAVE_FLUSH);
    }
}

/// The store as a previous run left it (its own chain, lines and watermarks), or a fresh one.
fn restore(identity: &Identity, restored: Restored, retention: crate::store::Retention, now: Instant) -> Store {
    let me = identity.id();
    let (mut seq, mut head) = restored.floor.unwrap_or((0, chain::genesis(&me)));
    if let Some(last) = restored.own.last().filter(|l| l.seq > seq) {
        (seq, head) = (last.seq, last.hash);
    }
    let floor = restored.floor.unwrap_or((0, chain::genesis(&me)));
    let mut store = Store::new(me, seq, head, retention, now);
    store.restore_own(restored.own, floor, now);
    for (id, (mark, head)) in restored.marks {
        store.restore_mark(id, mark, head, now);
    }
    store
}

/// Counts for `/stats`.
#[derive(Debug, Default)]
struct Stats {
    dials: u64,
    accepted: u64,
    admitted: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Quit,
}

/// Closes the losing connection of a pair, telling the other side why.
fn close_as_duplicate(mut loser: Neighbour) {
    loser.send(Message::Dup.encode());
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
