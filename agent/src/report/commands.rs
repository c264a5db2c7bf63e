use std::collections::{HashMap, VecDeque};
use std::time::SystemTime;

use hearth_proto::v1::{self as pb, command::Kind, command_status::Phase};

/// The result of one command, as sent back in CommandStatus.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandOutcome {
    pub command_id: String,
    pub idempotency_key: String,
    pub phase: Phase,
    pub message: String,
}

impl CommandOutcome {
    pub fn into_status(self) -> pb::CommandStatus {
        pb::CommandStatus {
            command_id: self.command_id,
            idempotency_key: self.idempotency_key,
            phase: self.phase as i32,
            message: self.message,
            progress: 0.0,
        }
    }
}

fn kind_name(k: Option<&Kind>) -> &'static str {
    match k {
        None => "empty",
        Some(Kind::Prefetch(_)) => "prefetch",
        Some(Kind::Evict(_)) => "evict",
        Some(Kind::Pin(_)) => "pin",
        Some(Kind::ApplyPartition(_)) => "apply_partition",
        Some(Kind::StartRuntime(_)) => "start_runtime",
        Some(Kind::StopRuntime(_)) => "stop_runtime",
        Some(Kind::Drain(_)) => "drain",
    }
}

/// Remembers this many idempotency keys; a controller retry older than that is run again,
/// which every handler must tolerate anyway.
const REMEMBERED_KEYS: usize = 4096;

/// Routes controller commands to the subsystem that owns them, enforcing deadlines and
/// idempotency in one place. A kind with no subsystem on this agent is rejected with a
/// reason the controller can act on (pick another node), never silently dropped.
#[derive(Debug, Default)]
pub struct CommandDispatcher {
    /// Command kinds this agent can run; filled in as subsystems register.
    supported: Vec<&'static str>,
    seen: HashMap<String, CommandOutcome>,
    order: VecDeque<String>,
}

impl CommandDispatcher {
    pub fn dispatch(&mut self, cmd: pb::Command, now: SystemTime) -> CommandOutcome {
        if !cmd.idempotency_key.is_empty()
            && let Some(prev) = self.seen.get(&cmd.idempotency_key)
        {
            // Same key, same answer; the id is the retry's own.
            return CommandOutcome { command_id: cmd.id, ..prev.clone() };
        }
        let kind = kind_name(cmd.kind.as_ref());
        let expired = cmd.deadline.and_then(|d| SystemTime::try_from(d).ok()).is_some_and(|d| d <= now);
        let (phase, message) = if cmd.kind.is_none() {
            (Phase::Rejected, "command has no kind set".to_owned())
        } else if expired {
            (Phase::Rejected, format!("{kind} command arrived after its deadline"))
        } else if !self.supported.contains(&kind) {
            let have = if self.supported.is_empty() { "none".to_owned() } else { self.supported.join(", ") };
            (Phase::Rejected, format!("this agent cannot run {kind} commands (it runs: {have})"))
        } else {
            (Phase::Accepted, String::new())
        };
        let outcome = CommandOutcome { command_id: cmd.id, idempotency_key: cmd.idempotency_key.clone(), phase, message };
        if !cmd.idempotency_key.is_empty() {
            if self.order.len() == REMEMBERED_KEYS
                && let Some(old) = self.order.pop_front()
            {
                self.seen.remove(&old);
            }
            self.order.push_back(cmd.idempotency_key.clone());
            self.seen.insert(cmd.idempotency_key, outcome.clone());
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cmd(id: &str, key: &str, deadline: Option<SystemTime>) -> pb::Command {
        pb::Command {
            id: id.into(),
            idempotency_key: key.into(),
            deadline: deadline.map(Into::into),
            kind: Some(Kind::Evict(pb::EvictCommand { model_id: "m".into() })),
        }
    }

    #[test]
    fn unsupported_kinds_are_rejected_with_the_reason() {
        let mut d = CommandDispatcher::default();
        let o = d.dispatch(cmd("1", "k1", None), SystemTime::now());
        assert_eq!(o.phase, Phase::Rejected);
        assert_eq!(o.message, "this agent cannot run evict commands (it runs: none)");
    }

    #[test]
    fn expired_deadline_is_rejected() {
        let mut d = CommandDispatcher { supported: vec!["evict"], ..Default::default() };
        let now = SystemTime::now();
        let o = d.dispatch(cmd("1", "k1", Some(now - Duration::from_secs(1))), now);
        assert_eq!((o.phase, o.message.as_str()), (Phase::Rejected, "evict command arrived after its deadline"));
        let o = d.dispatch(cmd("2", "k2", Some(now + Duration::from_secs(60))), now);
        assert_eq!(o.phase, Phase::Accepted);
    }

    #[test]
    fn same_key_gets_the_same_answer_even_after_the_deadline() {
        let mut d = CommandDispatcher { supported: vec!["evict"], ..Default::default() };
        let now = SystemTime::now();
        let first = d.dispatch(cmd("1", "k", Some(now + Duration::from_secs(5))), now);
        let retry = d.dispatch(cmd("2", "k", Some(now + Duration::from_secs(5))), now + Duration::from_secs(10));
        assert_eq!(first.phase, Phase::Accepted);
        assert_eq!((retry.phase, retry.command_id.as_str()), (Phase::Accepted, "2"));
    }

    #[test]
    fn remembered_keys_are_bounded() {
        let mut d = CommandDispatcher::default();
        for i in 0..(REMEMBERED_KEYS + 10) {
            d.dispatch(cmd(&i.to_string(), &format!("k{i}"), None), SystemTime::now());
        }
        assert_eq!(d.seen.len(), REMEMBERED_KEYS);
        assert!(!d.seen.contains_key("k0"));
    }
}
