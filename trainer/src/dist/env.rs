//! Where this process sits in the job: torchrun's variables, read and checked.

use crate::sys::error::UserError;
use anyhow::Result;

/// Where this process sits in the job, from the variables torchrun (and `charlm-trainer launch`,
/// and Kubeflow's PyTorchJob) set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// `launch` hosts the store (TORCHELASTIC_USE_AGENT_STORE): every rank, rank 0 included,
    /// connects to it as a client, and this round's keys live apart from other rounds'.
    pub agent_store: bool,
    /// The restart round `launch` started this process in (TORCHELASTIC_RESTART_COUNT; 0 at
    /// first).
    pub restart: u64,
    /// What was wrong with the variables; [`ProcessGroup::init`] reports it.
    problem: Option<String>,
}

pub const DEFAULT_MASTER_PORT: u16 = charlm_contract::RENDEZVOUS_PORT;

impl DistEnv {
    /// A single process: rank 0 of 1.
    pub fn single() -> Self {
        Self::new(0, 1, 0, 1, "127.0.0.1", DEFAULT_MASTER_PORT)
    }

    pub fn new(
        rank: usize,
        world_size: usize,
        local_rank: usize,
        local_world_size: usize,
        master_addr: &str,
        master_port: u16,
    ) -> Self {
        let mut env = Self {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr: master_addr.to_string(),
            master_port,
            agent_store: false,
            restart: 0,
            problem: None,
        };
        env.problem = env.inconsistency();
        env
    }

    /// The same place, in restart round `restart` of a `launch` that hosts the store.
    pub fn under_agent(mut self, restart: u64) -> Self {
        self.agent_store = true;
        self.restart = restart;
        self
    }

    /// Reads RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Without
    /// WORLD_SIZE this is a single process. Malformed values do not fail here (the caller may not
    /// be distributed at all) but in [`ProcessGroup::init`] and [`DistEnv::check`].
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`DistEnv::from_env`] over any source of variables.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        match Self::parse(&var) {
            Ok(env) => env,
            Err(problem) => Self {
                problem: Some(problem),
                ..Self::single()
            },
        }
    }

    fn parse(var: &impl Fn(&str) -> Option<String>) -> std::result::Result<Self, String> {
        let number = |name: &str| -> std::result::Result<Option<usize>, String> {
            match var(name) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .map_err(|_| format!("{name}={v:?} is not a non-negative integer")),
            }
        };
        let Some(world_size) = number("WORLD_SIZE")? else {
            if var("RANK").is_some() {
                return Err(
                    "RANK is set but WORLD_SIZE is not: set both (or neither, for one process)"
                        .into(),
                );
            }
            return Ok(Self::single());
        };
        let rank =
            number("RANK")?.ok_or("WORLD_SIZE is set but RANK is not: set both (or neither)")?;
        let local_rank = number("LOCAL_RANK")?.unwrap_or(0);
        let local_world_size = number("LOCAL_WORLD_SIZE")?.unwrap_or(1);
        let master_addr = match var("MASTER_ADDR") {
            Some(a) if !a.trim().is_empty() => a.trim().to_string(),
            _ if world_size > 1 => {
                return Err(format!(
                    "WORLD_SIZE={world_size} but MASTER_ADDR is not set: set it to rank 0's host"
                ))
            }
            _ => "127.0.0.1".to_string(),
        };
        let master_port = match var("MASTER_PORT") {
            None => DEFAULT_MASTER_PORT,
            Some(p) => match p.trim().parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => return Err(format!("MASTER_PORT={p:?} is not a TCP port (1-65535)")),
            },
        };
        let mut env = Self::new(
            rank,
            world_size,
            local_rank,
            local_world_size,
            &master_addr,
            master_port,
        );
        let agent = charlm_contract::env::USE_AGENT_STORE;
        match var(agent).as_deref().map(str::trim) {
            None | Some("" | "0" | "False" | "false") => {}
            Some("1" | "True" | "true") => {
                let restart = number(charlm_contract::env::RESTART_COUNT)?.unwrap_or(0);
                env = env.under_agent(restart as u64);
            }
            Some(other) => return Err(format!("{agent}={other:?} is not True or False")),
        }
        match env.problem {
            Some(problem) => Err(problem),
            None => Ok(env),
        }
    }

    fn inconsistency(&self) -> Option<String> {
        if self.world_size == 0 {
            Some("WORLD_SIZE must be at least 1".into())
        } else if self.rank >= self.world_size {
            Some(format!(
                "RANK={} is not below WORLD_SIZE={}",
                self.rank, self.world_size
            ))
        } else if self.local_world_size == 0 || self.local_rank >= self.local_world_size {
            Some(format!(
                "LOCAL_RANK={} is not below LOCAL_WORLD_SIZE={}",
                self.local_rank, self.local_world_size
            ))
        } else if self.local_world_size > self.world_size {
            Some(format!(
                "LOCAL_WORLD_SIZE={} exceeds WORLD_SIZE={}",
                self.local_world_size, self.world_size
            ))
        } else {
            None
        }
    }

    /// Fails (as a user error) when the variables were malformed or inconsistent.
    pub fn check(&self) -> Result<()> {
        match &self.problem {
            Some(problem) => Err(UserError(format!("distributed environment: {problem}")).into()),
            None => Ok(()),
        }
    }
}
