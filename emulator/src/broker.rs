//! The broker: entities (queues, topics, subscriptions, dead-letter queues),
//! message states, locks, sessions, scheduling, TTL and duplicate detection.
//!
//! All state sits behind one mutex; operations are short and never await.
//! Connections register a [`Notify`] on a store when they wait for messages.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use fe2o3_amqp_types::messaging::annotations::OwnedKey;
use fe2o3_amqp_types::messaging::{Header, MessageId};
use fe2o3_amqp_types::primitives::SimpleValue;
use serde_amqp::Value;
use serde_amqp::primitives::{OrderedMap, Symbol};
use tokio::sync::Notify;

use crate::config::{
    EntityProperties, Filter, QueueConfig, Rule, SubscriptionConfig, TopicConfig, Topology,
};
use crate::filters::CompiledFilter;
use crate::message::{AmqpMessage, now_ms, timestamp, uuid_value};

/// Well-known error conditions.
pub mod condition {
    /// Entity or message not found.
    pub const NOT_FOUND: &str = "amqp:not-found";
    /// Operation not allowed.
    pub const NOT_ALLOWED: &str = "amqp:not-allowed";
    /// Lock lost.
    pub const MESSAGE_LOCK_LOST: &str = "com.microsoft:message-lock-lost";
    /// Session lock lost.
    pub const SESSION_LOCK_LOST: &str = "com.microsoft:session-lock-lost";
    /// No session could be locked.
    pub const SESSION_CANNOT_BE_LOCKED: &str = "com.microsoft:session-cannot-be-locked";
    /// Message too large.
    pub const MESSAGE_SIZE_EXCEEDED: &str = "amqp:link:message-size-exceeded";
    /// Message not found.
    pub const MESSAGE_NOT_FOUND: &str = "com.microsoft:message-not-found";
    /// Bad argument.
    pub const ARGUMENT_ERROR: &str = "com.microsoft:argument-error";
    /// Timeout.
    pub const TIMEOUT: &str = "com.microsoft:timeout";
    /// Dead-letter outcome error.
    pub const DEAD_LETTER: &str = "com.microsoft:dead-letter";
}

/// A broker-level failure with an AMQP error condition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{condition}: {description}")]
pub struct BrokerError {
    /// AMQP error condition symbol.
    pub condition: &'static str,
    /// Human-readable description.
    pub description: String,
}

impl BrokerError {
    fn new(condition: &'static str, description: impl Into<String>) -> Self {
        BrokerError {
            condition,
            description: description.into(),
        }
    }
    /// The HTTP-style status code used in management replies.
    pub fn status_code(&self) -> i32 {
        match self.condition {
            condition::NOT_FOUND | condition::MESSAGE_NOT_FOUND => 404,
            condition::MESSAGE_LOCK_LOST | condition::SESSION_LOCK_LOST => 410,
            condition::SESSION_CANNOT_BE_LOCKED => 410,
            condition::NOT_ALLOWED => 403,
            condition::MESSAGE_SIZE_EXCEEDED => 413,
            condition::TIMEOUT => 408,
            _ => 400,
        }
    }
}

/// How a locked message is settled.
#[derive(Debug, Clone)]
pub enum Settlement {
    /// Remove the message.
    Complete,
    /// Unlock and count a delivery.
    Abandon(Option<OrderedMap<Symbol, Value>>),
    /// Move to the dead-letter queue.
    DeadLetter {
        /// DeadLetterReason
        reason: Option<String>,
        /// DeadLetterErrorDescription
        description: Option<String>,
        /// Properties to modify.
        annotations: Option<OrderedMap<Symbol, Value>>,
    },
    /// Defer: only receivable by sequence number.
    Defer(Option<OrderedMap<Symbol, Value>>),
    /// Unlock without counting a delivery.
    Release,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MsgState {
    Active,
    Deferred,
    Scheduled(i64),
}

#[derive(Debug, Clone)]
struct Msg {
    m: AmqpMessage,
    seq: i64,
    enqueued_ms: i64,
    delivery_count: u32,
    state: MsgState,
    lock: Option<(uuid::Uuid, i64)>,
    expires_ms: Option<i64>,
    dead_letter_source: Option<String>,
}

#[derive(Debug, Default)]
struct SessionInfo {
    state: Option<Vec<u8>>,
    owner: Option<u64>,
    locked_until: i64,
    updated_ms: i64,
}

struct Store {
    name: String,
    props: EntityProperties,
    dlq: Option<String>,
    /// Boxed: B-tree nodes hold values inline, and half-full nodes would waste a Msg each.
    messages: BTreeMap<i64, Box<Msg>>,
    ready: BTreeSet<i64>,
    lock_expiry: BTreeSet<(i64, i64)>,
    scheduled: BTreeSet<(i64, i64)>,
    expiry: BTreeSet<(i64, i64)>,
    next_seq: i64,
    waiters: Vec<Arc<Notify>>,
    sessions: HashMap<String, SessionInfo>,
    duplicates: HashMap<String, i64>,
    rules: Vec<(String, CompiledFilter)>,
}

impl Store {
    fn new(name: String, props: EntityProperties, dlq: Option<String>) -> Self {
        Store {
            name,
            props,
            dlq,
            messages: BTreeMap::new(),
            ready: BTreeSet::new(),
            lock_expiry: BTreeSet::new(),
            scheduled: BTreeSet::new(),
            expiry: BTreeSet::new(),
            next_seq: 1,
            waiters: Vec::new(),
            sessions: HashMap::new(),
            duplicates: HashMap::new(),
            rules: Vec::new(),
        }
    }

    fn wake(&mut self) {
        for w in self.waiters.drain(..) {
            w.notify_one();
        }
    }

    fn session_locked_by_other(&self, sid: Option<&str>, owner: u64, now: i64) -> bool {
        match sid.and_then(|s| self.sessions.get(s)) {
            Some(info) => info.owner.is_some_and(|o| o != owner) && info.locked_until > now,
            None => false,
        }
    }
}

struct Topic {
    name: String,
    props: EntityProperties,
    subscriptions: Vec<String>,
    duplicates: HashMap<String, i64>,
    scheduled: BTreeMap<i64, (i64, AmqpMessage)>,
    next_seq: i64,
}

/// What a receiver gets: the encoded message and its lock token.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Lock token (random for receive-and-delete deliveries).
    pub lock_token: uuid::Uuid,
    /// The message as sent to the client.
    pub payload: Vec<u8>,
    /// Sequence number.
    pub sequence_number: i64,
}

#[derive(Default)]
struct State {
    stores: HashMap<String, Store>,
    topics: HashMap<String, Topic>,
    locks: HashMap<uuid::Uuid, (String, i64)>,
}

/// A resolved entity address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `$cbs`
    Cbs,
    /// `<entity>/$management`
    Management(String),
    /// A queue, topic, subscription or dead-letter queue (canonical lowercase path).
    Entity(String),
}

/// Strip scheme and authority, map names to canonical lowercase paths.
pub fn parse_address(address: &str) -> Address {
    let mut path = address.trim();
    if let Some(idx) = path.find("://") {
        path = &path[idx + 3..];
        path = path.find('/').map_or("", |i| &path[i + 1..]);
    }
    let path = path.trim_matches('/').to_ascii_lowercase();
    if path == "$cbs" {
        return Address::Cbs;
    }
    if let Some(base) = path.strip_suffix("/$management") {
        return Address::Management(canonical(base));
    }
    Address::Entity(canonical(&path))
}

fn canonical(path: &str) -> String {
    let p = path.replace("/$transfer/$deadletterqueue", "/$deadletterqueue");
    p.trim_matches('/').to_string()
}

/// The broker shared by all connections.
pub struct Broker {
    state: Mutex<State>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

fn simple_string(v: Option<String>) -> SimpleValue {
    v.map_or(SimpleValue::Null, SimpleValue::String)
}

fn message_id_key(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => format!("s:{s}"),
        MessageId::Ulong(u) => format!("u:{u}"),
        MessageId::Uuid(u) => format!("g:{:?}", u.as_inner()),
        MessageId::Binary(b) => format!("b:{b:?}"),
    }
}

fn apply_annotations(m: &mut AmqpMessage, ann: Option<OrderedMap<Symbol, Value>>) {
    if let Some(ann) = ann {
        for (k, v) in ann {
            m.annotations.insert(OwnedKey::Symbol(k), v);
        }
    }
}

/// Encode the header section with every field present (some clients require delivery-count).
fn encode_header(h: Option<&Header>, delivery_count: u32) -> Vec<u8> {
    let (durable, priority, ttl) = h.map_or((false, 4, None), |h| (h.durable, h.priority.0, h.ttl));
    let mut list = Vec::with_capacity(16);
    list.push(if durable { 0x41 } else { 0x42 });
    list.extend_from_slice(&[0x50, priority]);
    match ttl {
        Some(t) => {
            list.push(0x70);
            list.extend_from_slice(&t.to_be_bytes());
        }
        None => list.push(0x40),
    }
    list.push(if delivery_count == 0 { 0x41 } else { 0x42 });
    list.push(0x70);
    list.extend_from_slice(&delivery_count.to_be_bytes());
    let mut out = vec![0x00, 0x53, 0x70, 0xc0, (list.len() + 1) as u8, 5];
    out.extend_from_slice(&list);
    out
}

fn encode_msg(msg: &Msg, lock: Option<(uuid::Uuid, i64)>) -> Vec<u8> {
    let mut m = msg.m.clone();
    m.set_annotation("x-opt-sequence-number", Value::Long(msg.seq));
    m.set_annotation("x-opt-enqueue-sequence-number", Value::Long(msg.seq));
    m.set_annotation("x-opt-enqueued-time", timestamp(msg.enqueued_ms));
    let state = match msg.state {
        MsgState::Active => 0,
        MsgState::Deferred => 1,
        MsgState::Scheduled(_) => 2,
    };
    m.set_annotation("x-opt-message-state", Value::Int(state));
    if let Some((_, until)) = lock {
        m.set_annotation("x-opt-locked-until", timestamp(until));
    }
    if let Some(src) = &msg.dead_letter_source {
        m.set_annotation("x-opt-deadletter-source", Value::String(src.clone()));
    }
    let mut out = encode_header(msg.m.header.as_ref(), msg.delivery_count);
    let da = lock.map(|(token, _)| {
        let mut da = OrderedMap::new();
        da.insert(
            OwnedKey::Symbol(Symbol::from("x-opt-lock-token")),
            uuid_value(token),
        );
        da
    });
    m.header = None;
    out.extend_from_slice(&m.encode_with(None, da.as_ref()));
    out
}

impl Default for Broker {
    fn default() -> Self {
        Broker {
            state: Mutex::new(State::default()),
        }
    }
}

impl Broker {
    /// A broker with the given topology.
    pub fn new(topology: &Topology) -> Result<Self, BrokerError> {
        let b = Broker::default();
        for q in &topology.queues {
            b.create_queue(q)?;
        }
        for t in &topology.topics {
            b.create_topic(t)?;
        }
        Ok(b)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another task panicked mid-operation; the
        // state is still structurally valid, so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Create a queue (replacing nothing: an existing name is an error).
    pub fn create_queue(&self, q: &QueueConfig) -> Result<(), BrokerError> {
        let key = q.name.to_ascii_lowercase();
        let mut st = self.lock();
        if st.stores.contains_key(&key) || st.topics.contains_key(&key) {
            return Err(BrokerError::new(
                "com.microsoft:entity-already-exists",
                format!("entity {} exists", q.name),
            ));
        }
        let dlq_key = format!("{key}/$deadletterqueue");
        st.stores.insert(
            dlq_key.clone(),
            Store::new(
                format!("{}/$DeadLetterQueue", q.name),
                q.properties.clone(),
                None,
            ),
        );
        st.stores.insert(
            key,
            Store::new(q.name.clone(), q.properties.clone(), Some(dlq_key)),
        );
        Ok(())
    }

    /// Create a topic with its subscriptions.
    pub fn create_topic(&self, t: &TopicConfig) -> Result<(), BrokerError> {
        let key = t.name.to_ascii_lowercase();
        {
            let mut st = self.lock();
            if st.stores.contains_key(&key) || st.topics.contains_key(&key) {
                return Err(BrokerError::new(
                    "com.microsoft:entity-already-exists",
                    format!("entity {} exists", t.name),
                ));
            }
            st.topics.insert(
                key,
                Topic {
                    name: t.name.clone(),
                    props: t.properties.clone(),
                    subscriptions: Vec::new(),
                    duplicates: HashMap::new(),
                    scheduled: BTreeMap::new(),
                    next_seq: 1,
                },
            );
        }
        for s in &t.subscriptions {
            self.create_subscription(&t.name, s)?;
        }
        Ok(())
    }

    /// Create a subscription on an existing topic.
    pub fn create_subscription(
        &self,
        topic: &str,
        s: &SubscriptionConfig,
    ) -> Result<(), BrokerError> {
        let tkey = topic.to_ascii_lowercase();
        let mut rules = Vec::new();
        let configured: Vec<Rule> = if s.rules.is_empty() {
            vec![Rule {
                name: "$Default".into(),
                filter: Filter::True,
            }]
        } else {
            s.rules.clone()
        };
        for r in &configured {
            let f = CompiledFilter::compile(&r.filter).map_err(|e| {
                BrokerError::new(condition::ARGUMENT_ERROR, format!("rule {}: {e}", r.name))
            })?;
            rules.push((r.name.clone(), f));
        }
        let mut st = self.lock();
        let tname = match st.topics.get(&tkey) {
            Some(t) => t.name.clone(),
            None => {
                return Err(BrokerError::new(
                    condition::NOT_FOUND,
                    format!("topic {topic} not found"),
                ));
            }
        };
        let key = format!("{tkey}/subscriptions/{}", s.name.to_ascii_lowercase());
        if st.stores.contains_key(&key) {
            return Err(BrokerError::new(
                "com.microsoft:entity-already-exists",
                format!("subscription {key} exists"),
            ));
        }
        let dlq_key = format!("{key}/$deadletterqueue");
        let name = format!("{tname}/Subscriptions/{}", s.name);
        st.stores.insert(
            dlq_key.clone(),
            Store::new(
                format!("{name}/$DeadLetterQueue"),
                s.properties.clone(),
                None,
            ),
        );
        let mut store = Store::new(name, s.properties.clone(), Some(dlq_key));
        store.rules = rules;
        st.stores.insert(key.clone(), store);
        if let Some(t) = st.topics.get_mut(&tkey) {
            t.subscriptions.push(key);
        }
        Ok(())
    }

    /// Add a rule to a subscription (canonical path).
    pub fn add_rule(&self, subscription: &str, rule: &Rule) -> Result<(), BrokerError> {
        let filter = CompiledFilter::compile(&rule.filter).map_err(|e| {
            BrokerError::new(
                condition::ARGUMENT_ERROR,
                format!("rule {}: {e}", rule.name),
            )
        })?;
        let mut st = self.lock();
        let store = st
            .stores
            .get_mut(subscription)
            .filter(|s| s.dlq.is_some() && subscription.contains("/subscriptions/"))
            .ok_or_else(|| not_found(subscription))?;
        if store
            .rules
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(&rule.name))
        {
            return Err(BrokerError::new(
                "com.microsoft:entity-already-exists",
                format!("The rule '{}' already exists.", rule.name),
            ));
        }
        store.rules.push((rule.name.clone(), filter));
        Ok(())
    }

    /// Remove a rule from a subscription.
    pub fn remove_rule(&self, subscription: &str, name: &str) -> Result<(), BrokerError> {
        let mut st = self.lock();
        let store = st
            .stores
            .get_mut(subscription)
            .ok_or_else(|| not_found(subscription))?;
        let before = store.rules.len();
        store.rules.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        if store.rules.len() == before {
            return Err(BrokerError::new(
                condition::MESSAGE_NOT_FOUND,
                format!("The rule '{name}' could not be found."),
            ));
        }
        Ok(())
    }

    /// Whether an entity path (canonical) exists; `Some(true)` if it is a topic.
    pub fn entity_kind(&self, key: &str) -> Option<EntityKind> {
        let st = self.lock();
        if st.topics.contains_key(key) {
            return Some(EntityKind::Topic);
        }
        st.stores.get(key).map(|s| EntityKind::Store {
            requires_session: s.props.requires_session && s.dlq.is_some(),
            max_message_size: s.props.max_message_size,
        })
    }

    /// Largest message accepted by an entity.
    pub fn max_message_size(&self, key: &str) -> u64 {
        let st = self.lock();
        st.topics
            .get(key)
            .map(|t| t.props.max_message_size)
            .or_else(|| st.stores.get(key).map(|s| s.props.max_message_size))
            .unwrap_or(256 * 1024)
    }

    /// Send messages to a queue or topic (the size limit is checked on the link).
    pub fn send(&self, key: &str, msgs: Vec<AmqpMessage>) -> Result<(), BrokerError> {
        let now = now_ms();
        let mut st = self.lock();
        if !st.topics.contains_key(key) && !st.stores.contains_key(key) {
            return Err(not_found(key));
        }
        for mut m in msgs {
            for k in [
                "x-opt-sequence-number",
                "x-opt-enqueued-time",
                "x-opt-locked-until",
                "x-opt-message-state",
                "x-opt-enqueue-sequence-number",
                "x-opt-deadletter-source",
            ] {
                m.remove_annotation(k);
            }
            let scheduled = match m.annotation("x-opt-scheduled-enqueue-time") {
                Some(Value::Timestamp(t)) if t.milliseconds() > now => Some(t.milliseconds()),
                _ => None,
            };
            enqueue_entity(&mut st, key, m, scheduled, now, 0)?;
        }
        Ok(())
    }

    /// Schedule messages; returns their sequence numbers.
    pub fn schedule(
        &self,
        key: &str,
        msgs: Vec<(AmqpMessage, i64)>,
    ) -> Result<Vec<i64>, BrokerError> {
        let now = now_ms();
        let mut st = self.lock();
        let mut seqs = Vec::new();
        for (m, at) in msgs {
            seqs.push(enqueue_entity(&mut st, key, m, Some(at.max(now)), now, 0)?);
        }
        Ok(seqs)
    }

    /// Cancel scheduled messages.
    pub fn cancel_scheduled(&self, key: &str, seqs: &[i64]) -> Result<(), BrokerError> {
        let mut st = self.lock();
        if let Some(t) = st.topics.get_mut(key) {
            for s in seqs {
                t.scheduled.remove(s);
            }
            return Ok(());
        }
        let store = st.stores.get_mut(key).ok_or_else(|| not_found(key))?;
        for s in seqs {
            if let Some(msg) = store.messages.get(s)
                && let MsgState::Scheduled(at) = msg.state
            {
                store.scheduled.remove(&(at, *s));
                store.messages.remove(s);
            }
        }
        Ok(())
    }

    /// Register a waiter woken when messages become available in a store.
    pub fn wait(&self, key: &str, notify: &Arc<Notify>) {
        let mut st = self.lock();
        if let Some(s) = st.stores.get_mut(key)
            && !s.waiters.iter().any(|w| Arc::ptr_eq(w, notify))
        {
            s.waiters.push(notify.clone());
        }
    }

    /// Take the next available message: locked (peek-lock) or removed (receive-and-delete).
    pub fn receive(
        &self,
        key: &str,
        peek_lock: bool,
        session: Option<&str>,
        notify: &Arc<Notify>,
    ) -> Option<Delivery> {
        let now = now_ms();
        let mut guard = self.lock();
        receive_next(&mut guard, key, peek_lock, session, notify, now)
    }

    /// Settle a locked message.
    pub fn settle(&self, token: uuid::Uuid, how: Settlement) -> Result<(), BrokerError> {
        let now = now_ms();
        let mut guard = self.lock();
        let st = &mut *guard;
        let (key, seq) = st.locks.remove(&token).ok_or_else(lock_lost)?;
        let store = st.stores.get_mut(&key).ok_or_else(lock_lost)?;
        let msg = store.messages.get_mut(&seq).ok_or_else(lock_lost)?;
        let Some((t, until)) = msg.lock else {
            return Err(lock_lost());
        };
        if t != token {
            return Err(lock_lost());
        }
        store.lock_expiry.remove(&(until, seq));
        msg.lock = None;
        if until <= now {
            // Lock expired before the sweep ran: treat like expiry.
            count_unsettled_delivery(st, &key, seq, now);
            return Err(lock_lost());
        }
        match how {
            Settlement::Complete => {
                store.messages.remove(&seq);
            }
            Settlement::Release => {
                if msg.state == MsgState::Active {
                    store.ready.insert(seq);
                    store.wake();
                }
            }
            Settlement::Abandon(ann) => {
                apply_annotations(&mut msg.m, ann);
                count_unsettled_delivery(st, &key, seq, now);
            }
            Settlement::Defer(ann) => {
                apply_annotations(&mut msg.m, ann);
                msg.state = MsgState::Deferred;
            }
            Settlement::DeadLetter {
                reason,
                description,
                annotations,
            } => {
                apply_annotations(&mut msg.m, annotations);
                dead_letter(st, &key, seq, reason, description, now);
            }
        }
        Ok(())
    }

    /// Renew locks; returns the new expirations (unix ms).
    pub fn renew_locks(&self, tokens: &[uuid::Uuid]) -> Result<Vec<i64>, BrokerError> {
        let now = now_ms();
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut out = Vec::new();
        for token in tokens {
            let (key, seq) = st.locks.get(token).cloned().ok_or_else(lock_lost)?;
            let store = st.stores.get_mut(&key).ok_or_else(lock_lost)?;
            let dur = store.props.lock_duration.as_millis() as i64;
            let msg = store.messages.get_mut(&seq).ok_or_else(lock_lost)?;
            match msg.lock {
                Some((t, until)) if t == *token && until > now => {
                    store.lock_expiry.remove(&(until, seq));
                    let new_until = now + dur;
                    msg.lock = Some((t, new_until));
                    store.lock_expiry.insert((new_until, seq));
                    out.push(new_until);
                }
                _ => return Err(lock_lost()),
            }
        }
        Ok(out)
    }

    /// Peek messages from a sequence number on.
    pub fn peek(
        &self,
        key: &str,
        from: i64,
        count: usize,
        session: Option<&str>,
    ) -> Result<Vec<Vec<u8>>, BrokerError> {
        let st = self.lock();
        let store = st.stores.get(key).ok_or_else(|| not_found(key))?;
        Ok(store
            .messages
            .range(from..)
            .filter(|(_, m)| session.is_none() || m.m.session_id() == session)
            .take(count)
            .map(|(_, m)| encode_msg(m, None))
            .collect())
    }

    /// Receive deferred messages by sequence number.
    pub fn receive_deferred(
        &self,
        key: &str,
        seqs: &[i64],
        peek_lock: bool,
        session: Option<&str>,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let now = now_ms();
        let mut guard = self.lock();
        let st = &mut *guard;
        let store = st.stores.get(key).ok_or_else(|| not_found(key))?;
        for s in seqs {
            match store.messages.get(s) {
                Some(m)
                    if m.state == MsgState::Deferred && m.lock.is_none_or(|(_, u)| u <= now) =>
                {
                    if session.is_some() && m.m.session_id() != session {
                        return Err(BrokerError::new(
                            condition::MESSAGE_NOT_FOUND,
                            format!("deferred message {s} not found in this session"),
                        ));
                    }
                }
                _ => {
                    return Err(BrokerError::new(
                        condition::MESSAGE_NOT_FOUND,
                        format!("Failed to retrieve deferred message with sequence number {s}"),
                    ));
                }
            }
        }
        Ok(seqs
            .iter()
            .map(|s| deliver(st, key, *s, peek_lock, now))
            .collect())
    }

    /// Lock a session for an owner: a given id, or the next available one.
    pub fn lock_session(
        &self,
        key: &str,
        want: Option<&str>,
        owner: u64,
    ) -> Result<Option<(String, i64)>, BrokerError> {
        let now = now_ms();
        let mut st = self.lock();
        let store = st.stores.get_mut(key).ok_or_else(|| not_found(key))?;
        let dur = store.props.lock_duration.as_millis() as i64;
        let sid = match want {
            Some(s) => {
                if store.session_locked_by_other(Some(s), owner, now) {
                    return Err(BrokerError::new(
                        condition::SESSION_CANNOT_BE_LOCKED,
                        format!(
                            "The requested session '{s}' cannot be accepted. It may be locked by another receiver."
                        ),
                    ));
                }
                s.to_string()
            }
            None => {
                let found = store.ready.iter().find_map(|seq| {
                    let sid = store.messages.get(seq)?.m.session_id()?;
                    (!store.session_locked_by_other(Some(sid), owner, now)).then(|| sid.to_string())
                });
                match found {
                    Some(s) => s,
                    None => return Ok(None),
                }
            }
        };
        let info = store.sessions.entry(sid.clone()).or_default();
        info.owner = Some(owner);
        info.locked_until = now + dur;
        Ok(Some((sid, now + dur)))
    }

    /// Release a session lock held by an owner.
    pub fn release_session(&self, key: &str, sid: &str, owner: u64) {
        let mut st = self.lock();
        if let Some(store) = st.stores.get_mut(key) {
            if let Some(info) = store.sessions.get_mut(sid)
                && info.owner == Some(owner)
            {
                info.owner = None;
                info.locked_until = 0;
            }
            store.wake();
        }
    }

    /// Renew a session lock.
    pub fn renew_session_lock(&self, key: &str, sid: &str) -> Result<i64, BrokerError> {
        let now = now_ms();
        let mut st = self.lock();
        let store = st.stores.get_mut(key).ok_or_else(|| not_found(key))?;
        let dur = store.props.lock_duration.as_millis() as i64;
        let info = store
            .sessions
            .get_mut(sid)
            .filter(|i| i.owner.is_some())
            .ok_or_else(|| {
                BrokerError::new(
                    condition::SESSION_LOCK_LOST,
                    format!("session {sid} is not locked"),
                )
            })?;
        info.locked_until = now + dur;
        Ok(now + dur)
    }

    /// Session state.
    pub fn session_state(&self, key: &str, sid: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        let st = self.lock();
        let store = st.stores.get(key).ok_or_else(|| not_found(key))?;
        Ok(store.sessions.get(sid).and_then(|i| i.state.clone()))
    }

    /// Set session state.
    pub fn set_session_state(
        &self,
        key: &str,
        sid: &str,
        state: Option<Vec<u8>>,
    ) -> Result<(), BrokerError> {
        let mut st = self.lock();
        let store = st.stores.get_mut(key).ok_or_else(|| not_found(key))?;
        let info = store.sessions.entry(sid.to_string()).or_default();
        info.state = state;
        info.updated_ms = now_ms();
        Ok(())
    }

    /// Session ids with messages or state.
    pub fn session_ids(&self, key: &str) -> Result<Vec<String>, BrokerError> {
        let st = self.lock();
        let store = st.stores.get(key).ok_or_else(|| not_found(key))?;
        let mut ids: BTreeSet<String> = store
            .messages
            .values()
            .filter_map(|m| m.m.session_id().map(str::to_string))
            .collect();
        ids.extend(
            store
                .sessions
                .iter()
                .filter(|(_, i)| i.state.is_some())
                .map(|(k, _)| k.clone()),
        );
        Ok(ids.into_iter().collect())
    }

    /// Number of messages in a store (all states), for tests and diagnostics.
    pub fn message_count(&self, key: &str) -> Option<usize> {
        self.lock()
            .stores
            .get(&key.to_ascii_lowercase())
            .map(|s| s.messages.len())
    }

    /// Expire locks, activate scheduled messages, expire messages past their TTL.
    pub fn sweep(&self) {
        let now = now_ms();
        let mut guard = self.lock();
        let st = &mut *guard;
        // Topic-level scheduled messages.
        let tkeys: Vec<String> = st.topics.keys().cloned().collect();
        for tk in tkeys {
            let due: Vec<i64> = st.topics.get(&tk).map_or_else(Vec::new, |t| {
                t.scheduled
                    .iter()
                    .filter(|(_, (at, _))| *at <= now)
                    .map(|(s, _)| *s)
                    .collect()
            });
            for s in due {
                if let Some((_, m)) = st.topics.get_mut(&tk).and_then(|t| t.scheduled.remove(&s)) {
                    let _ = fan_out(st, &tk, m, now, 0);
                }
            }
        }
        let keys: Vec<String> = st.stores.keys().cloned().collect();
        for key in keys {
            let Some(store) = st.stores.get_mut(&key) else {
                continue;
            };
            let mut woke = false;
            while let Some(&(at, seq)) = store.scheduled.iter().next() {
                if at > now {
                    break;
                }
                store.scheduled.remove(&(at, seq));
                if let Some(m) = store.messages.get_mut(&seq) {
                    m.state = MsgState::Active;
                    m.enqueued_ms = now;
                    store.ready.insert(seq);
                    woke = true;
                }
            }
            let mut lost = Vec::new();
            while let Some(&(until, seq)) = store.lock_expiry.iter().next() {
                if until > now {
                    break;
                }
                store.lock_expiry.remove(&(until, seq));
                lost.push(seq);
            }
            let mut to_dlq = Vec::new();
            for seq in lost {
                if let Some(m) = store.messages.get_mut(&seq) {
                    if let Some((token, _)) = m.lock.take() {
                        st.locks.remove(&token);
                    }
                    m.delivery_count += 1;
                    if m.delivery_count >= store.props.max_delivery_count && store.dlq.is_some() {
                        to_dlq.push(seq);
                    } else if m.state == MsgState::Active {
                        store.ready.insert(seq);
                        woke = true;
                    }
                }
            }
            let mut expired = Vec::new();
            while let Some(&(at, seq)) = store.expiry.iter().next() {
                if at > now {
                    break;
                }
                store.expiry.remove(&(at, seq));
                expired.push(seq);
            }
            if woke {
                store.wake();
            }
            let max = store.props.max_delivery_count;
            for seq in to_dlq {
                dead_letter_after_max_deliveries(st, &key, seq, max, now);
            }
            for seq in expired {
                let locked = st
                    .stores
                    .get(&key)
                    .and_then(|s| s.messages.get(&seq))
                    .is_some_and(|m| m.lock.is_some());
                if locked {
                    if let Some(s) = st.stores.get_mut(&key) {
                        s.expiry.insert((now + 1000, seq));
                    }
                } else {
                    expire_message(st, &key, seq, now);
                }
            }
        }
    }
}

/// What an entity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntityKind {
    /// A topic (send only).
    Topic,
    /// A queue, subscription or dead-letter queue.
    Store {
        /// Whether receivers must lock a session.
        requires_session: bool,
        /// Max message size.
        max_message_size: u64,
    },
}

fn not_found(key: &str) -> BrokerError {
    BrokerError::new(
        condition::NOT_FOUND,
        format!("The messaging entity '{key}' could not be found."),
    )
}

fn lock_lost() -> BrokerError {
    BrokerError::new(
        condition::MESSAGE_LOCK_LOST,
        "The lock supplied is invalid. Either the lock expired, or the message has already been removed from the queue.",
    )
}

fn receive_next(
    st: &mut State,
    key: &str,
    peek_lock: bool,
    session: Option<&str>,
    notify: &Arc<Notify>,
    now: i64,
) -> Option<Delivery> {
    // Expired messages met on the way are expired (or dead-lettered) and skipped.
    loop {
        let store = st.stores.get_mut(key)?;
        let seq = match session {
            None => store.ready.iter().next().copied(),
            Some(sid) => store
                .ready
                .iter()
                .find(|s| store.messages.get(s).and_then(|m| m.m.session_id()) == Some(sid))
                .copied(),
        };
        let Some(seq) = seq else {
            if !store.waiters.iter().any(|w| Arc::ptr_eq(w, notify)) {
                store.waiters.push(notify.clone());
            }
            return None;
        };
        store.ready.remove(&seq);
        if store
            .messages
            .get(&seq)
            .and_then(|m| m.expires_ms)
            .is_some_and(|e| e <= now)
        {
            expire_message(st, key, seq, now);
            continue;
        }
        return Some(deliver(st, key, seq, peek_lock, now));
    }
}

fn deliver(st: &mut State, key: &str, seq: i64, peek_lock: bool, now: i64) -> Delivery {
    let token = uuid::Uuid::new_v4();
    let Some(store) = st.stores.get_mut(key) else {
        return Delivery {
            lock_token: token,
            payload: Vec::new(),
            sequence_number: seq,
        };
    };
    let dur = store.props.lock_duration.as_millis() as i64;
    if peek_lock {
        let until = now + dur;
        let payload = match store.messages.get_mut(&seq) {
            Some(m) => {
                m.lock = Some((token, until));
                encode_msg(m, Some((token, until)))
            }
            None => Vec::new(),
        };
        store.lock_expiry.insert((until, seq));
        st.locks.insert(token, (key.to_string(), seq));
        Delivery {
            lock_token: token,
            payload,
            sequence_number: seq,
        }
    } else {
        let payload = store
            .messages
            .remove(&seq)
            .map(|m| encode_msg(&m, None))
            .unwrap_or_default();
        Delivery {
            lock_token: token,
            payload,
            sequence_number: seq,
        }
    }
}

fn expire_message(st: &mut State, key: &str, seq: i64, now: i64) {
    let Some(store) = st.stores.get_mut(key) else {
        return;
    };
    if store.props.dead_lettering_on_message_expiration && store.dlq.is_some() {
        dead_letter(
            st,
            key,
            seq,
            Some("TTLExpiredException".into()),
            Some("The message expired and was dead lettered.".into()),
            now,
        );
    } else {
        store.ready.remove(&seq);
        store.messages.remove(&seq);
    }
}

/// Counts a delivery that ended unsettled (abandoned, or its lock lost): at the entity's
/// max delivery count the message is dead-lettered (when the entity has a dead-letter
/// queue), otherwise an active message is ready again.
fn count_unsettled_delivery(st: &mut State, key: &str, seq: i64, now: i64) {
    let Some(store) = st.stores.get_mut(key) else {
        return;
    };
    let Some(msg) = store.messages.get_mut(&seq) else {
        return;
    };
    msg.delivery_count += 1;
    let max = store.props.max_delivery_count;
    if msg.delivery_count >= max && store.dlq.is_some() {
        dead_letter_after_max_deliveries(st, key, seq, max, now);
    } else if msg.state == MsgState::Active {
        store.ready.insert(seq);
        store.wake();
    }
}

/// Dead-letters a message delivered `max` times, with Service Bus's reason and text.
fn dead_letter_after_max_deliveries(st: &mut State, key: &str, seq: i64, max: u32, now: i64) {
    dead_letter(
        st,
        key,
        seq,
        Some("MaxDeliveryCountExceeded".into()),
        Some(format!(
            "Message could not be consumed after {max} delivery attempts."
        )),
        now,
    );
}

fn dead_letter(
    st: &mut State,
    key: &str,
    seq: i64,
    reason: Option<String>,
    description: Option<String>,
    now: i64,
) {
    let Some(store) = st.stores.get_mut(key) else {
        return;
    };
    let Some(dlq) = store.dlq.clone() else { return };
    let source = store.name.clone();
    let forward = store.props.forward_dead_lettered_messages_to.clone();
    let Some(mut msg) = store.messages.remove(&seq) else {
        return;
    };
    store.ready.remove(&seq);
    if let Some((t, until)) = msg.lock.take() {
        store.lock_expiry.remove(&(until, seq));
        st.locks.remove(&t);
    }
    msg.m
        .set_property("DeadLetterReason", simple_string(reason));
    msg.m
        .set_property("DeadLetterErrorDescription", simple_string(description));
    if let Some(fwd) = forward {
        let _ = enqueue_entity(st, &fwd.to_ascii_lowercase(), msg.m, None, now, 1);
        return;
    }
    let Some(d) = st.stores.get_mut(&dlq) else {
        return;
    };
    msg.state = MsgState::Active;
    msg.expires_ms = None;
    msg.dead_letter_source = Some(source);
    let s = msg.seq;
    d.messages.insert(s, msg);
    d.ready.insert(s);
    d.wake();
}

fn enqueue_entity(
    st: &mut State,
    key: &str,
    mut m: AmqpMessage,
    scheduled: Option<i64>,
    now: i64,
    hops: u32,
) -> Result<i64, BrokerError> {
    if hops > 4 {
        return Err(BrokerError::new(
            condition::NOT_ALLOWED,
            "auto-forwarding chain too long",
        ));
    }
    if st.topics.contains_key(key) {
        let Some(t) = st.topics.get_mut(key) else {
            return Err(not_found(key));
        };
        if t.props.requires_duplicate_detection
            && let Some(id) = m.message_id().map(message_id_key)
        {
            let window = t.props.duplicate_detection_window.as_millis() as i64;
            t.duplicates.retain(|_, at| *at + window > now);
            if t.duplicates.contains_key(&id) {
                return Ok(0);
            }
            t.duplicates.insert(id, now);
        }
        if let Some(at) = scheduled {
            let seq = t.next_seq;
            t.next_seq += 1;
            t.scheduled.insert(seq, (at, m));
            return Ok(seq);
        }
        return fan_out(st, key, m, now, hops);
    }
    let store = st.stores.get_mut(key).ok_or_else(|| not_found(key))?;
    if store.dlq.is_none() {
        return Err(BrokerError::new(
            condition::NOT_ALLOWED,
            format!("cannot send to {}", store.name),
        ));
    }
    if key.contains("/subscriptions/") && hops == 0 {
        return Err(BrokerError::new(
            condition::NOT_ALLOWED,
            format!("cannot send to subscription {}", store.name),
        ));
    }
    if let Some(fwd) = store.props.forward_to.clone() {
        return enqueue_entity(st, &fwd.to_ascii_lowercase(), m, scheduled, now, hops + 1);
    }
    if store.props.requires_duplicate_detection
        && let Some(id) = m.message_id().map(message_id_key)
    {
        let window = store.props.duplicate_detection_window.as_millis() as i64;
        store.duplicates.retain(|_, at| *at + window > now);
        if store.duplicates.contains_key(&id) {
            return Ok(0);
        }
        store.duplicates.insert(id, now);
    }
    if store.props.requires_session && m.session_id().is_none() {
        return Err(BrokerError::new(
            "amqp:invalid-field",
            format!(
                "The SessionId was not set on a message, and it cannot be sent to the entity '{}'. Entities that have session support enabled can only receive messages that have a non-null SessionId.",
                store.name
            ),
        ));
    }
    let ttl = m.header.as_ref().and_then(|h| h.ttl).map(i64::from);
    let default_ttl = store.props.default_message_ttl.as_millis() as i64;
    let ttl = ttl.map_or(default_ttl, |t| t.min(default_ttl));
    let seq = store.next_seq;
    store.next_seq += 1;
    let enqueued = scheduled.unwrap_or(now);
    let expires = enqueued.saturating_add(ttl);
    m.remove_annotation("x-opt-scheduled-enqueue-time");
    if let Some(at) = scheduled {
        m.set_annotation("x-opt-scheduled-enqueue-time", timestamp(at));
    }
    let state = scheduled.map_or(MsgState::Active, MsgState::Scheduled);
    store.messages.insert(
        seq,
        Box::new(Msg {
            m,
            seq,
            enqueued_ms: enqueued,
            delivery_count: 0,
            state,
            lock: None,
            expires_ms: Some(expires),
            dead_letter_source: None,
        }),
    );
    store.expiry.insert((expires, seq));
    match state {
        MsgState::Scheduled(at) => {
            store.scheduled.insert((at, seq));
        }
        _ => {
            store.ready.insert(seq);
            store.wake();
        }
    }
    Ok(seq)
}

fn fan_out(
    st: &mut State,
    tkey: &str,
    m: AmqpMessage,
    now: i64,
    hops: u32,
) -> Result<i64, BrokerError> {
    let subs = st
        .topics
        .get(tkey)
        .map(|t| t.subscriptions.clone())
        .unwrap_or_default();
    for sk in subs {
        let matched = st
            .stores
            .get(&sk)
            .is_some_and(|s| s.rules.iter().any(|(_, f)| f.matches(&m)));
        if matched {
            enqueue_entity(st, &sk, m.clone(), None, now, hops + 1)?;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address("amqps://localhost:5672/Queue.1"),
            Address::Entity("queue.1".into())
        );
        assert_eq!(
            parse_address("amqp://h/t/Subscriptions/S/$management"),
            Address::Management("t/subscriptions/s".into())
        );
        assert_eq!(parse_address("$cbs"), Address::Cbs);
        assert_eq!(
            parse_address("q/$Transfer/$DeadLetterQueue"),
            Address::Entity("q/$deadletterqueue".into())
        );
    }

    #[test]
    fn header_always_has_delivery_count() {
        let h = encode_header(None, 0);
        let parsed: Header = serde_amqp::from_slice(&h).expect("header decodes");
        assert_eq!(parsed.delivery_count, 0);
        assert_eq!(h.len(), 6 + 1 + 2 + 1 + 1 + 5);
    }

    fn plain(body: &str) -> AmqpMessage {
        AmqpMessage {
            body: bytes::Bytes::from(body.to_string()),
            ..Default::default()
        }
    }

    #[test]
    fn forward_to_and_forward_dead_lettered() {
        let mut a = QueueConfig::new("a");
        a.properties.forward_to = Some("B".into());
        let mut c = QueueConfig::new("c");
        c.properties.forward_dead_lettered_messages_to = Some("b".into());
        let topology = Topology {
            queues: vec![a, QueueConfig::new("b"), c],
            ..Default::default()
        };
        let broker = Broker::new(&topology).expect("topology");
        broker.send("a", vec![plain("x")]).expect("send");
        assert_eq!(broker.message_count("a"), Some(0));
        assert_eq!(broker.message_count("b"), Some(1));
        broker.send("c", vec![plain("y")]).expect("send");
        let notify = Arc::new(Notify::new());
        let d = broker.receive("c", true, None, &notify).expect("a message");
        let how = Settlement::DeadLetter {
            reason: Some("r".into()),
            description: None,
            annotations: None,
        };
        broker.settle(d.lock_token, how).expect("dead-letter");
        assert_eq!(broker.message_count("c/$deadletterqueue"), Some(0));
        assert_eq!(broker.message_count("b"), Some(2));
        assert!(
            broker.settle(d.lock_token, Settlement::Complete).is_err(),
            "a settled lock is gone"
        );
    }

    #[test]
    fn expired_message_without_dead_lettering_is_dropped() {
        let mut q = QueueConfig::new("q");
        q.properties.default_message_ttl = std::time::Duration::from_millis(0);
        let broker = Broker::new(&Topology {
            queues: vec![q],
            ..Default::default()
        })
        .expect("topology");
        broker.send("q", vec![plain("gone")]).expect("send");
        let notify = Arc::new(Notify::new());
        assert!(broker.receive("q", false, None, &notify).is_none());
        assert_eq!(broker.message_count("q"), Some(0));
        assert_eq!(broker.message_count("q/$deadletterqueue"), Some(0));
    }
}
