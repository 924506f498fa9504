//! The workspace definition (the seed's `workspaces:` form) and checkout manifests, parsed
//! and checked.
//!
//! Every struct refuses unknown keys, and every value with rules of its own (paths, modes,
//! owners, schedules, env entries, names) is checked while it is read, so an error names the
//! key and its line: `workspaces[0].checkouts[0].path: ... at line 5 column 11`.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::cron::Schedule;

/// A definition or manifest that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("{0}")]
    Yaml(String),
    #[error("{0}")]
    Invalid(String),
}

fn yaml_error(e: serde_yaml_ng::Error) -> DefinitionError {
    DefinitionError::Yaml(e.to_string())
}

/// A sandbox definition: its workspaces.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub workspaces: Vec<Workspace>,
}

/// One workspace of a definition.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workspace {
    pub name: Name,
    #[serde(default)]
    pub checkouts: Vec<Checkout>,
    #[serde(default)]
    pub system: System,
    /// A tar archive unpacked into the home on the workspace's first start (a path on the
    /// agent's machine).
    #[serde(default)]
    pub home_snapshot: Option<String>,
}

/// `system:`: files injected on every start, and global daemons.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct System {
    #[serde(default)]
    pub files: Vec<FileSpec>,
    #[serde(default)]
    pub daemons: Vec<GlobalDaemon>,
}

/// A file to inject.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    pub path: InjectPath,
    /// `uid:gid`; by default 0:0 outside the home and 1000:1000 inside it (the page's rule).
    #[serde(default)]
    pub owner: Option<Owner>,
    #[serde(default)]
    pub mode: Option<Mode>,
    #[serde(default)]
    pub content: Option<String>,
    /// A Go-style template with `{{env "EXPR"}}` and `{{secret "NAME"}}`.
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub overwrite: bool,
}

/// A global daemon (from the definition, or a file under `/etc/sandbox.d/daemons`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalDaemon {
    pub name: Name,
    pub run: Run,
    #[serde(default)]
    pub disable_on_start: bool,
}

/// A checkout.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkout {
    /// Relative, under the home.
    pub path: RelDir,
    pub repo: Repo,
    /// A branch, a tag or a commit; the remote's default branch when missing.
    #[serde(default)]
    pub version_spec: Option<String>,
    #[serde(default)]
    pub history: Option<History>,
    #[serde(default)]
    pub disable_recursive_checkout: bool,
    #[serde(default)]
    pub manifest: Option<ManifestSpec>,
}

/// Where a checkout comes from: `git: URL` or `github: {org, repo}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RepoSpec")]
pub enum Repo {
    /// An ssh (`git@host:org/repo`) or https URL, or (for tests and local sandboxes) a path
    /// or `file://` URL.
    Git(String),
    Github {
        org: String,
        repo: String,
    },
}

/// `repo:` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RepoSpec {
    #[serde(default)]
    git: Option<String>,
    #[serde(default)]
    github: Option<GithubSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GithubSpec {
    org: String,
    repo: String,
}

impl TryFrom<RepoSpec> for Repo {
    type Error = String;
    fn try_from(r: RepoSpec) -> Result<Self, String> {
        match (r.git, r.github) {
            (Some(url), None) if !url.trim().is_empty() => Ok(Self::Git(url)),
            (Some(_), None) => Err("repo: git: the URL is empty".into()),
            (None, Some(g)) => {
                let ok = |s: &str| {
                    !s.is_empty()
                        && s.chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                };
                if !ok(&g.org) || !ok(&g.repo) {
                    return Err(format!(
                        "repo: github: '{}/{}' is not an organisation and repository name",
                        g.org, g.repo
                    ));
                }
                Ok(Self::Github {
                    org: g.org,
                    repo: g.repo,
                })
            }
            _ => Err("repo: needs exactly one of git or github".into()),
        }
    }
}

impl Repo {
    /// The URL git fetches from.
    pub fn url(&self) -> String {
        match self {
            Self::Git(u) => u.clone(),
            Self::Github { org, repo } => format!("https://github.com/{org}/{repo}"),
        }
    }
}

/// How much history to fetch.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct History {
    /// `git clone --depth`.
    #[serde(default)]
    pub depth: Option<u32>,
    /// `git clone --shallow-since` (a date git understands, such as `2025-10-12`).
    #[serde(default)]
    pub since: Option<String>,
}

/// `manifest:` of a checkout: overlays merged in order, or `.sandbox/manifest.yaml`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestSpec {
    #[serde(default)]
    pub overlays: Vec<Overlay>,
}

/// One overlay: exactly one of `inline`, `content` (YAML text) or `file` (relative to the
/// checkout).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overlay {
    #[serde(default)]
    pub name: Option<String>,
    /// A missing `file` is skipped instead of failing the checkout.
    #[serde(default)]
    pub optional: bool,
    #[serde(default)]
    pub inline: Option<Manifest>,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub file: Option<RelDir>,
}

/// A checkout's manifest (or one overlay of it).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(default)]
    pub env: EnvList,
    #[serde(default)]
    pub hooks: Hooks,
    #[serde(default)]
    pub daemons: BTreeMap<Name, Daemon>,
    #[serde(default)]
    pub jobs: BTreeMap<Name, Job>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    #[serde(default, rename = "post-checkout")]
    pub post_checkout: Option<Run>,
    #[serde(default)]
    pub build: Option<Run>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Daemon {
    pub run: Run,
    #[serde(default)]
    pub disable_on_start: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub run: Run,
    pub schedule: CronSchedule,
    #[serde(default)]
    pub disable_on_start: bool,
}

/// The run schema of hooks, daemons and jobs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    /// Passed to `$SHELL -c`.
    pub cmd: String,
    /// Relative to the checkout (the home for global daemons); must exist when it runs.
    #[serde(default)]
    pub dir: Option<RelDir>,
    /// Appended after the manifest's top-level `env`.
    #[serde(default)]
    pub env: EnvList,
}

// ---------------------------------------------------------------------------------------------
// Checked values.

/// A name of a workspace, daemon or job: it names log files and appears on command lines.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Name(String);

impl TryFrom<String> for Name {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            && !s.starts_with(['.', '-']);
        if ok {
            Ok(Self(s))
        } else {
            Err(format!(
                "invalid name '{s}': use 1-63 letters, digits, '-', '_' or '.', not starting \
                 with '.' or '-'"
            ))
        }
    }
}

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A relative path that stays inside its base: no `..`, not absolute, not empty.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct RelDir(String);

impl TryFrom<String> for RelDir {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let trimmed = s.trim_end_matches('/');
        if trimmed.is_empty() || trimmed == "." {
            return Err(format!(
                "invalid path '{s}': it must name something under its base"
            ));
        }
        if s.starts_with('/') || s.starts_with('~') {
            return Err(format!("invalid path '{s}': it must be relative"));
        }
        if trimmed.split('/').any(|p| p == "..") {
            return Err(format!("invalid path '{s}': '..' would leave its base"));
        }
        if s.contains('\0') {
            return Err(format!("invalid path '{s}': it contains a NUL byte"));
        }
        Ok(Self(trimmed.to_string()))
    }
}

impl RelDir {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An injected file's path: absolute, or under the home with `~/`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum InjectPath {
    Absolute(String),
    /// The part after `~/`.
    Home(RelDir),
}

impl TryFrom<String> for InjectPath {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("~/") {
            return RelDir::try_from(rest.to_string()).map(Self::Home);
        }
        if !s.starts_with('/') || s.len() < 2 {
            return Err(format!(
                "invalid path '{s}': a file to inject needs an absolute path or one starting with ~/"
            ));
        }
        if s.ends_with('/') || s.split('/').any(|p| p == "..") || s.contains('\0') {
            return Err(format!(
                "invalid path '{s}': it must name a file, without '..'"
            ));
        }
        Ok(Self::Absolute(s))
    }
}

/// A file mode, written in octal (`'0644'`, `'755'`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Mode(pub u32);

impl TryFrom<String> for Mode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match u32::from_str_radix(&s, 8) {
            Ok(m) if m <= 0o7777 && !s.is_empty() => Ok(Self(m)),
            _ => Err(format!(
                "invalid mode '{s}': expected octal digits such as '0644' (quote it in YAML)"
            )),
        }
    }
}

/// `uid:gid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl TryFrom<String> for Owner {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("invalid owner '{s}': expected uid:gid such as 1000:1000");
        let (u, g) = s.split_once(':').ok_or_else(bad)?;
        Ok(Self {
            uid: u.parse().map_err(|_| bad())?,
            gid: g.parse().map_err(|_| bad())?,
        })
    }
}

/// A job's schedule, checked when read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct CronSchedule(pub Schedule);

impl TryFrom<String> for CronSchedule {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Schedule::parse(&s).map(Self).map_err(|e| e.to_string())
    }
}

/// An env list (`- NAME=VALUE`), each entry checked when read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "Vec<EnvEntry>")]
pub struct EnvList(pub Vec<String>);

impl From<Vec<EnvEntry>> for EnvList {
    fn from(v: Vec<EnvEntry>) -> Self {
        Self(v.into_iter().map(|e| e.0).collect())
    }
}

/// One `NAME=VALUE` entry, checked.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
struct EnvEntry(String);

impl TryFrom<String> for EnvEntry {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        crate::env::check(std::slice::from_ref(&s)).map_err(|e| e.to_string())?;
        Ok(Self(s))
    }
}

// ---------------------------------------------------------------------------------------------
// Reading and merging.

impl Definition {
    /// Parses and checks a definition.
    pub fn parse(text: &str) -> Result<Self, DefinitionError> {
        let def: Self = serde_yaml_ng::from_str(text).map_err(yaml_error)?;
        if def.workspaces.is_empty() {
            return Err(DefinitionError::Invalid(
                "workspaces: the definition has none".into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, w) in def.workspaces.iter().enumerate() {
            if !seen.insert(&w.name) {
                return Err(DefinitionError::Invalid(format!(
                    "workspaces[{i}].name: workspace '{}' is named twice",
                    w.name
                )));
            }
            w.check(i)?;
        }
        Ok(def)
    }
}

impl Workspace {
    fn check(&self, i: usize) -> Result<(), DefinitionError> {
        let invalid = |m: String| Err(DefinitionError::Invalid(m));
        let mut paths = std::collections::BTreeSet::new();
        for (j, c) in self.checkouts.iter().enumerate() {
            if !paths.insert(c.path.as_str()) {
                return invalid(format!(
                    "workspaces[{i}].checkouts[{j}].path: '{}' is checked out twice",
                    c.path.as_str()
                ));
            }
            if let Some(m) = &c.manifest {
                for (k, o) in m.overlays.iter().enumerate() {
                    let n = [o.inline.is_some(), o.content.is_some(), o.file.is_some()]
                        .iter()
                        .filter(|b| **b)
                        .count();
                    if n != 1 {
                        return invalid(format!(
                            "workspaces[{i}].checkouts[{j}].manifest.overlays[{k}]: needs \
                             exactly one of inline, content or file (it has {n})"
                        ));
                    }
                }
            }
        }
        for (j, f) in self.system.files.iter().enumerate() {
            if f.content.is_some() == f.template.is_some() {
                return invalid(format!(
                    "workspaces[{i}].system.files[{j}]: needs exactly one of content or template"
                ));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (j, d) in self.system.daemons.iter().enumerate() {
            if !names.insert(&d.name) {
                return invalid(format!(
                    "workspaces[{i}].system.daemons[{j}].name: daemon '{}' is named twice",
                    d.name
                ));
            }
        }
        Ok(())
    }
}

impl Manifest {
    /// Parses one manifest (or overlay) text.
    pub fn parse(text: &str) -> Result<Self, DefinitionError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml_ng::from_str(text).map_err(yaml_error)
    }

    /// Merges `later` over `self`: env lists concatenate (later entries see earlier ones),
    /// a hook, daemon or job of the same name is replaced whole.
    pub fn merge(&mut self, later: Manifest) {
        self.env.0.extend(later.env.0);
        if later.hooks.post_checkout.is_some() {
            self.hooks.post_checkout = later.hooks.post_checkout;
        }
        if later.hooks.build.is_some() {
            self.hooks.build = later.hooks.build;
        }
        self.daemons.extend(later.daemons);
        self.jobs.extend(later.jobs);
    }

    /// The merged manifest of `overlays`, in order.
    pub fn merged(overlays: impl IntoIterator<Item = Manifest>) -> Self {
        let mut m = Self::default();
        for o in overlays {
            m.merge(o);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_EXAMPLE: &str = r#"
workspaces:
- name: example
  checkouts:
  - path: foo
    repo:
      git: git@github.com:example-org/foo
    version_spec: next
    history:
      depth: 1
    manifest:
      overlays:
      - inline:
          hooks:
            post-checkout:
              cmd: |
                npm install
            build:
              cmd: |
                npm run build
          daemons:
            server:
              run:
                cmd: npm start
  - path: bar
    repo:
      github:
        org: example-org
        repo: bar
    disable_recursive_checkout: true
  system:
    files:
    - path: /etc/sandbox.d/setup
      mode: '0755'
      overwrite: true
      content: |
        #!/bin/bash
        echo "Performing system-level customization"
    - path: ~/.sandbox/setup
      mode: '0700'
      template: |
        #!/bin/bash
        echo "{{secret "some-token"}}" >~/.my-token
    daemons:
    - name: foo
      run:
        cmd: foo args
"#;

    #[test]
    fn the_seeds_examples_parse() {
        let d = Definition::parse(SEED_EXAMPLE).unwrap();
        let w = &d.workspaces[0];
        assert_eq!(w.name.as_str(), "example");
        assert_eq!(w.checkouts[0].path.as_str(), "foo");
        assert_eq!(w.checkouts[0].version_spec.as_deref(), Some("next"));
        assert_eq!(w.checkouts[0].history.as_ref().unwrap().depth, Some(1));
        let o = &w.checkouts[0].manifest.as_ref().unwrap().overlays[0];
        let m = o.inline.as_ref().unwrap();
        assert_eq!(m.hooks.build.as_ref().unwrap().cmd, "npm run build\n");
        assert_eq!(m.daemons.keys().next().unwrap().as_str(), "server");
        assert_eq!(
            w.checkouts[1].repo.url(),
            "https://github.com/example-org/bar"
        );
        assert!(w.checkouts[1].disable_recursive_checkout);
        assert_eq!(w.system.files[0].mode, Some(Mode(0o755)));
        assert!(
            matches!(&w.system.files[1].path, InjectPath::Home(p) if p.as_str() == ".sandbox/setup")
        );
        assert_eq!(w.system.daemons[0].run.cmd, "foo args");
    }

    #[test]
    fn the_seeds_full_manifest_parses() {
        let m = Manifest::parse(
            r#"
env:
- FOO=BAR
hooks:
  post-checkout:
    cmd: ./post-checkout.sh
    dir: scripts
    env:
    - FOO=my${BAR}
  build:
    cmd: ./build.sh
    dir: scripts
daemons:
  server:
    run:
      cmd: ./server
      dir: out
      env:
      - NODE_ENV=dev
    disable_on_start: true
  monitor:
    run:
      cmd: ./monitor
      dir: out
jobs:
  housekeeper:
    run:
      cmd: ./housekeep
      dir: out
    schedule: '* * * * *'
"#,
        )
        .unwrap();
        assert_eq!(m.env.0, ["FOO=BAR"]);
        assert_eq!(m.daemons.len(), 2);
        assert!(m
            .daemons
            .values()
            .next()
            .is_some_and(|d| !d.disable_on_start)); // monitor
        assert_eq!(
            m.jobs.values().next().unwrap().schedule.0.text(),
            "* * * * *"
        );
        assert_eq!(
            m.hooks.post_checkout.unwrap().dir.unwrap().as_str(),
            "scripts"
        );
    }

    fn err(text: &str) -> String {
        Definition::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key_and_line() {
        let e = err("workspaces:\n- name: a\n  checkouts:\n  - path: foo\n    repo: {git: x}\n    depht: 1\n");
        assert!(
            e.contains("unknown field `depht`") && e.contains("line 6"),
            "{e}"
        );
        let e = err("workspaces:\n- name: a\n  checkouts:\n  - path: foo\n    repo: {git: x}\n    history: {depth: lots}\n");
        assert!(e.contains("history.depth") && e.contains("line 6"), "{e}");
        let e = err("workspaces:\n- name: a\n  checkouts:\n  - path: /abs\n    repo: {git: x}\n");
        assert!(
            e.contains("invalid path '/abs'") && e.contains("line 4"),
            "{e}"
        );
        let e = err("workspaces:\n- name: a\n  checkouts:\n  - path: ../up\n    repo: {git: x}\n");
        assert!(e.contains("'..' would leave its base"), "{e}");
        let e = err(
            "workspaces:\n- name: a\n  system:\n    files:\n    - path: rel\n      content: x\n",
        );
        assert!(
            e.contains("absolute path or one starting with ~/") && e.contains("line 5"),
            "{e}"
        );
        let e = err("workspaces:\n- name: a\n  system:\n    files:\n    - path: /x\n      mode: '0999'\n      content: x\n");
        assert!(
            e.contains("files[0]: invalid mode '0999'") && e.contains("line 5"),
            "{e}"
        );
        let e = err("workspaces:\n- name: a\n  system:\n    files:\n    - path: /x\n      owner: root\n      content: x\n");
        assert!(e.contains("invalid owner 'root'"), "{e}");
        let e = err("workspaces:\n- name: a b\n");
        assert!(
            e.contains("invalid name 'a b'") && e.contains("line 2"),
            "{e}"
        );
        let e = err("workspaces: []\n");
        assert!(e.contains("has none"), "{e}");
        let e = err("workspaces:\n- name: a\n- name: a\n");
        assert!(e.contains("named twice"), "{e}");
        let e = err("workspaces:\n- name: a\n  system:\n    files:\n    - path: /x\n");
        assert!(e.contains("exactly one of content or template"), "{e}");
        let e = err("workspaces:\n- name: a\n  checkouts:\n  - path: f\n    repo: {svn: x}\n");
        assert!(e.contains("unknown field `svn`"), "{e}");
        let e = err("workspaces:\n- name: a\n  checkouts:\n  - path: f\n    repo: {git: x, github: {org: o, repo: r}}\n");
        assert!(e.contains("exactly one of git or github"), "{e}");
    }

    #[test]
    fn bad_manifest_values_name_the_key_and_line() {
        let e = Manifest::parse("jobs:\n  j:\n    run: {cmd: x}\n    schedule: '61 * * * *'\n")
            .unwrap_err()
            .to_string();
        // serde reports a checked value at its mapping: the job's line, with the key in the
        // message.
        assert!(
            e.contains("jobs.j: schedule '61 * * * *'") && e.contains("line 3"),
            "{e}"
        );
        let e = Manifest::parse("env:\n- FOO\n").unwrap_err().to_string();
        assert!(
            e.contains("env entry 'FOO' is not NAME=VALUE") && e.contains("line 2"),
            "{e}"
        );
        let e = Manifest::parse("daemons:\n  d:\n    run: {cmd: x, dir: /tmp}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("invalid path '/tmp'") && e.contains("line 3"),
            "{e}"
        );
        let e = Manifest::parse("hooks:\n  prebuild: {cmd: x}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown field `prebuild`") && e.contains("line 2"),
            "{e}"
        );
        assert_eq!(Manifest::parse("  \n").unwrap(), Manifest::default());
    }

    #[test]
    fn overlays_merge_in_order() {
        let a = Manifest::parse(
            "env: [A=1, B=x]\nhooks: {build: {cmd: make}}\ndaemons: {web: {run: {cmd: old}}, db: {run: {cmd: pg}}}\n",
        )
        .unwrap();
        let b = Manifest::parse(
            "env: ['A=${A}2']\nhooks: {post-checkout: {cmd: npm i}}\ndaemons: {web: {run: {cmd: new}}}\njobs: {j: {run: {cmd: x}, schedule: '@hourly'}}\n",
        )
        .unwrap();
        let m = Manifest::merged([a, b]);
        assert_eq!(m.env.0, ["A=1", "B=x", "A=${A}2"]);
        let mut env = crate::env::Env::new();
        crate::env::apply(&mut env, &m.env.0).unwrap();
        assert_eq!(env["A"], "12");
        assert_eq!(m.hooks.build.as_ref().unwrap().cmd, "make");
        assert_eq!(m.hooks.post_checkout.as_ref().unwrap().cmd, "npm i");
        let names: Vec<&str> = m.daemons.keys().map(Name::as_str).collect();
        assert_eq!(names, ["db", "web"]);
        assert_eq!(m.daemons.values().nth(1).unwrap().run.cmd, "new");
        assert_eq!(m.jobs.len(), 1);
    }
}
