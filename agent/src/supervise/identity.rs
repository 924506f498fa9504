//! Who runs what. When the agent runs as root (a real workspace) system-level steps
//! (`/etc/sandbox.d/setup`, `post-setup`, global daemons) run as root and everything else as
//! the workspace owner (`cs-agent serve --owner USER`); as an ordinary user (a local sandbox)
//! the agent runs everything as itself.

use anyhow::{bail, Context as _};

/// A user to run programs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<libc::gid_t>,
    pub home: std::path::PathBuf,
    pub shell: std::path::PathBuf,
}

impl User {
    /// Looks `name` up in the user database.
    pub fn lookup(name: &str) -> anyhow::Result<Self> {
        let u = nix::unistd::User::from_name(name)
            .with_context(|| format!("cannot look up user '{name}'"))?;
        let Some(u) = u else {
            bail!("--owner: no user named '{name}' on this machine");
        };
        let cname = std::ffi::CString::new(name).context("user name")?;
        let groups = nix::unistd::getgrouplist(&cname, u.gid)
            .with_context(|| format!("cannot list the groups of '{name}'"))?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        Ok(Self {
            name: u.name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            groups,
            home: u.dir,
            shell: u.shell,
        })
    }
}

impl User {
    /// The steps that make a child this user, between fork and exec: supplementary groups,
    /// group, then user (the order matters: only root may set groups). Only async-signal-safe
    /// calls; the group list is allocated before the fork.
    pub fn switch_fn(&self) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
        let (uid, gid, groups) = (self.uid, self.gid, self.groups.clone());
        move || {
            // SAFETY: setgroups, setgid and setuid are async-signal-safe and read only the
            // vector captured before the fork.
            unsafe {
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(gid) < 0
                    || libc::setuid(uid) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        }
    }
}
