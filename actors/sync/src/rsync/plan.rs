//! The transfer's plan: what rsync 3.x's generator does with the sender's file list and the
//! receiver's tree, in the generator's order (see `rsync/mod.rs` for how listings are built).
//!
//! Order (rsync's incremental recursion, `--delete` = `--delete-during`): a directory's
//! entries are sorted files first, then directories, each by name bytes. The root `.` is
//! itemized, then deletions in it, then its non-directories; its subdirectories are created
//! silently while the parent is processed and handled in full (deletions in them, their own
//! line, their entries) one after another, depth first. Deletions in a directory go in
//! reverse sorted order, a deleted directory's contents before it.

use std::collections::{BTreeMap, BTreeSet};

use super::filter::Rules;
use super::{Entry, Kind, Op, Options, Plan};

/// What the receiver must do so that `dst` becomes what rsync makes of it from `src`.
pub fn plan(src: &[Entry], dst: &[Entry], opts: &Options, rules: &Rules) -> Plan {
    let mut p = Planner::new(src, dst, opts, rules);
    p.run();
    p.out
}

/// `a/b` → `a`, `a` → `.`, `.` → none.
fn parent(path: &str) -> Option<&str> {
    if path == "." {
        return None;
    }
    Some(path.rfind('/').map_or(".", |i| &path[..i]))
}

/// rsync's order of a directory's entries: non-directories first, then directories, each
/// by name bytes.
fn sort_key(e: &Entry) -> (bool, &str) {
    (e.kind == Kind::Dir, e.path.as_str())
}

struct Planner<'a> {
    opts: &'a Options,
    rules: &'a Rules,
    src: BTreeMap<&'a str, &'a Entry>,
    dst: BTreeMap<&'a str, &'a Entry>,
    src_kids: BTreeMap<&'a str, Vec<&'a Entry>>,
    dst_kids: BTreeMap<&'a str, Vec<&'a Entry>>,
    /// Directories with an op on a direct child (their mtime must be set again).
    touched: BTreeSet<String>,
    out: Plan,
}

/// The change letters of one itemized line.
#[derive(Default)]
struct Flags {
    new: bool,
    c: bool,
    s: bool,
    t: Option<char>,
    p: bool,
    o: bool,
    g: bool,
}

impl Flags {
    fn any(&self) -> bool {
        self.new || self.c || self.s || self.t.is_some() || self.p || self.o || self.g
    }
}

fn type_char(kind: Kind) -> char {
    match kind {
        Kind::File => 'f',
        Kind::Dir => 'd',
        Kind::Symlink => 'L',
        Kind::Special => 'S',
    }
}

/// The name as rsync prints it: directories with a trailing `/` (the root is `./`).
fn shown(e: &Entry) -> String {
    match e.kind {
        Kind::Dir if e.path == "." => "./".to_string(),
        Kind::Dir => format!("{}/", e.path),
        Kind::Symlink => format!("{} -> {}", e.path, e.target.as_deref().unwrap_or("")),
        _ => e.path.clone(),
    }
}

/// `YXcstpoguax NAME`.
fn line(y: char, e: &Entry, f: &Flags) -> String {
    let mut c = [
        y,
        type_char(e.kind),
        '.',
        '.',
        '.',
        '.',
        '.',
        '.',
        '.',
        '.',
        '.',
    ];
    if f.new {
        for ch in &mut c[2..] {
            *ch = '+';
        }
    } else {
        if f.c {
            c[2] = 'c';
        }
        if f.s {
            c[3] = 's';
        }
        if let Some(t) = f.t {
            c[4] = t;
        }
        if f.p {
            c[5] = 'p';
        }
        if f.o {
            c[6] = 'o';
        }
        if f.g {
            c[7] = 'g';
        }
        if matches!(y, '.' | 'c' | 'h') && c[2..].iter().all(|&ch| ch == '.') {
            for ch in &mut c[2..] {
                *ch = ' ';
            }
        }
    }
    let mut s: String = c.iter().collect();
    s.push(' ');
    s.push_str(&shown(e));
    s
}

impl<'a> Planner<'a> {
    fn new(src: &'a [Entry], dst: &'a [Entry], opts: &'a Options, rules: &'a Rules) -> Self {
        let index = |list: &'a [Entry]| {
            let mut map = BTreeMap::new();
            let mut kids: BTreeMap<&'a str, Vec<&'a Entry>> = BTreeMap::new();
            for e in list {
                map.insert(e.path.as_str(), e);
            }
            for e in list {
                if let Some(p) = parent(&e.path) {
                    kids.entry(p).or_default().push(e);
                }
            }
            for v in kids.values_mut() {
                v.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
            }
            (map, kids)
        };
        let (src_map, src_kids) = index(src);
        let (dst_map, dst_kids) = index(dst);
        Planner {
            opts,
            rules,
            src: src_map,
            dst: dst_map,
            src_kids,
            dst_kids,
            touched: BTreeSet::new(),
            out: Plan::default(),
        }
    }

    fn excluded(&self, e: &Entry) -> bool {
        self.rules.is_excluded(&e.path, e.kind == Kind::Dir)
    }

    /// A receiver's path that the rules protect from deletion.
    fn protected(&self, e: &Entry) -> bool {
        !self.opts.delete_excluded && self.excluded(e)
    }

    fn op(&mut self, op: Op) {
        let path = match &op {
            Op::Delete { path, .. }
            | Op::Mkdir { path }
            | Op::Send { path, .. }
            | Op::Symlink { path, .. }
            | Op::Attrs { path, .. } => path,
        };
        if let Some(p) = parent(path) {
            self.touched.insert(p.to_string());
        }
        self.out.ops.push(op);
    }

    fn run(&mut self) {
        if let Some(root) = self.src.get(".").copied() {
            if root.kind != Kind::Dir {
                // A listing whose root is not a directory: nothing sensible to do.
                return;
            }
            if !self.opts.recursive && !self.opts.dirs {
                self.out.warnings.push("skipping directory .".to_string());
                return;
            }
            let existed = self.dir_itself(root);
            if self.opts.delete && existed {
                self.delete_in_dir(".");
            }
            self.entries(".");
            self.dir_attrs(root, existed);
        } else {
            // `rsync src/foo dst/`: the top-level items, no root.
            let mut top: Vec<&Entry> = self
                .src
                .values()
                .copied()
                .filter(|e| parent(&e.path).is_some_and(|p| !self.src.contains_key(p)))
                .collect();
            top.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
            self.list(&top);
        }
    }

    /// The entries of a directory whose contents are transferred.
    fn entries(&mut self, dir: &str) {
        let kids: Vec<&'a Entry> = self.src_kids.get(dir).cloned().unwrap_or_default();
        self.list(&kids);
    }

    /// One file list: non-directories, then directories (created early when recursing, then
    /// each handled in full, depth first).
    fn list(&mut self, kids: &[&'a Entry]) {
        let kids: Vec<&'a Entry> = kids.iter().copied().filter(|e| !self.excluded(e)).collect();
        for &e in kids.iter().filter(|e| e.kind != Kind::Dir) {
            self.out.files_considered += u64::from(e.kind == Kind::File);
            self.item(e);
        }
        let dirs: Vec<&'a Entry> = kids
            .iter()
            .copied()
            .filter(|e| e.kind == Kind::Dir)
            .collect();
        if !self.opts.recursive {
            for &d in &dirs {
                if self.opts.dirs {
                    let existed = self.dir_itself(d);
                    self.dir_attrs(d, existed);
                } else {
                    self.out
                        .warnings
                        .push(format!("skipping directory {}", d.path));
                }
            }
            return;
        }
        // Early creation, silently (rsync makes the directory while in its parent).
        let mut existed = Vec::new();
        for &d in &dirs {
            let ok = match self.dst.get(d.path.as_str()).copied() {
                Some(x) if x.kind == Kind::Dir => Some(true),
                Some(x) => self.make_room(x, "directory").then_some(false),
                None => Some(false),
            };
            if ok == Some(false) {
                self.op(Op::Mkdir {
                    path: d.path.clone(),
                });
            }
            existed.push(ok);
        }
        for (&d, ok) in dirs.iter().zip(existed) {
            let Some(existed) = ok else { continue };
            if self.opts.delete && existed {
                self.delete_in_dir(&d.path);
            }
            self.dir_line(d, existed);
            self.entries(&d.path);
            self.dir_attrs(d, existed);
        }
    }

    /// A directory's own line, when handled in place (the root, `-d`): makes room, creates
    /// it. Returns whether it existed as a directory.
    fn dir_itself(&mut self, d: &Entry) -> bool {
        let existed = match self.dst.get(d.path.as_str()).copied() {
            Some(x) if x.kind == Kind::Dir => true,
            Some(x) => {
                if !self.make_room(x, "directory") {
                    return false;
                }
                false
            }
            None => false,
        };
        if !existed {
            self.op(Op::Mkdir {
                path: d.path.clone(),
            });
        }
        self.dir_line(d, existed);
        existed
    }

    fn dir_line(&mut self, d: &Entry, existed: bool) {
        let f = if existed {
            let x = self.dst[d.path.as_str()];
            self.attr_flags(d, x)
        } else {
            Flags {
                new: true,
                ..Flags::default()
            }
        };
        if f.any() {
            self.out
                .itemized
                .push(line(if existed { '.' } else { 'c' }, d, &f));
        }
    }

    /// A directory's attributes, after its contents.
    fn dir_attrs(&mut self, d: &Entry, existed: bool) {
        let o = self.opts;
        let op = if existed {
            let x = self.dst[d.path.as_str()];
            let touched = self.touched.contains(&d.path);
            Op::Attrs {
                path: d.path.clone(),
                mode: (o.perms && x.mode != d.mode).then_some(d.mode),
                mtime: (o.times && (touched || x.mtime != d.mtime))
                    .then_some((d.mtime, d.mtime_nsec)),
                uid: (o.owner && x.uid != d.uid).then_some(d.uid),
                gid: (o.group && x.gid != d.gid).then_some(d.gid),
            }
        } else {
            self.new_attrs(d, None)
        };
        if let Op::Attrs {
            mode: None,
            mtime: None,
            uid: None,
            gid: None,
            ..
        } = op
        {
            return;
        }
        // Setting a directory's attributes does not touch its parent.
        self.out.ops.push(op);
    }

    /// The attributes of a newly made item (or a file sent over `old`).
    fn new_attrs(&self, e: &Entry, old: Option<&Entry>) -> Op {
        let o = self.opts;
        Op::Attrs {
            path: e.path.clone(),
            mode: if o.perms {
                Some(e.mode)
            } else {
                // rsync keeps an updated file's permissions; a new one gets the source's
                // masked by the receiver's umask (the caller's business).
                old.filter(|x| x.kind == Kind::File).map(|x| x.mode)
            },
            mtime: o.times.then_some((e.mtime, e.mtime_nsec)),
            uid: o.owner.then_some(e.uid),
            gid: o.group.then_some(e.gid),
        }
    }

    /// `t`/`p`/`o`/`g` between the sender's entry and the receiver's (same kind).
    fn attr_flags(&self, s: &Entry, x: &Entry) -> Flags {
        let o = self.opts;
        Flags {
            t: (o.times && s.mtime != x.mtime).then_some('t'),
            p: o.perms && s.kind != Kind::Symlink && s.mode != x.mode,
            o: o.owner && s.uid != x.uid,
            g: o.group && s.gid != x.gid,
            ..Flags::default()
        }
    }

    /// A non-directory of the file list.
    fn item(&mut self, e: &'a Entry) {
        match e.kind {
            Kind::File => self.file(e),
            Kind::Symlink if self.opts.links => self.symlink(e),
            Kind::Special if self.opts.devices => self.special(e),
            _ => self
                .out
                .warnings
                .push(format!("skipping non-regular file \"{}\"", e.path)),
        }
    }

    fn file(&mut self, e: &Entry) {
        let o = self.opts;
        let x = self.dst.get(e.path.as_str()).copied();
        let old = match x {
            Some(x) if x.kind == Kind::File => Some(x),
            Some(x) => {
                if !self.make_room(x, "regular file") {
                    return;
                }
                None
            }
            None => None,
        };
        let Some(x) = old else {
            let f = Flags {
                new: true,
                ..Flags::default()
            };
            self.out.itemized.push(line('>', e, &f));
            self.send(e, None);
            return;
        };
        let same = if x.size != e.size {
            false
        } else if let (true, Some(a), Some(b)) = (o.checksum, e.hash, x.hash) {
            a == b
        } else {
            x.mtime == e.mtime
        };
        let mut f = self.attr_flags(e, x);
        if same {
            if f.any() {
                self.out.itemized.push(line('.', e, &f));
                let Flags { t, p, o: ow, g, .. } = f;
                self.op(Op::Attrs {
                    path: e.path.clone(),
                    mode: p.then_some(e.mode),
                    mtime: t.map(|_| (e.mtime, e.mtime_nsec)),
                    uid: ow.then_some(e.uid),
                    gid: g.then_some(e.gid),
                });
            }
            return;
        }
        f.c = o.checksum;
        f.s = x.size != e.size;
        if !o.times {
            f.t = Some('T');
        }
        self.out.itemized.push(line('>', e, &f));
        self.send(e, Some(x));
    }

    fn send(&mut self, e: &Entry, old: Option<&Entry>) {
        self.out.files_sent += 1;
        self.out.bytes_to_send += e.size;
        self.op(Op::Send {
            path: e.path.clone(),
            basis: old.is_some(),
        });
        let attrs = self.new_attrs(e, old);
        self.op(attrs);
    }

    fn symlink(&mut self, e: &Entry) {
        let o = self.opts;
        let target = e.target.clone().unwrap_or_default();
        let x = self.dst.get(e.path.as_str()).copied();
        let f = match x {
            Some(x) if x.kind == Kind::Symlink => {
                let mut f = self.attr_flags(e, x);
                if x.target == e.target {
                    if f.any() {
                        self.out.itemized.push(line('.', e, &f));
                        self.op(Op::Attrs {
                            path: e.path.clone(),
                            mode: None,
                            mtime: f.t.map(|_| (e.mtime, e.mtime_nsec)),
                            uid: f.o.then_some(e.uid),
                            gid: f.g.then_some(e.gid),
                        });
                    }
                    return;
                }
                f.c = true;
                if !o.times {
                    f.t = Some('T');
                }
                f
            }
            Some(x) => {
                if !self.make_room(x, "symlink") {
                    return;
                }
                Flags {
                    new: true,
                    ..Flags::default()
                }
            }
            None => Flags {
                new: true,
                ..Flags::default()
            },
        };
        self.out.itemized.push(line('c', e, &f));
        self.op(Op::Symlink {
            path: e.path.clone(),
            target,
        });
        if let Op::Attrs {
            path,
            mtime,
            uid,
            gid,
            ..
        } = self.new_attrs(e, None)
        {
            if mtime.is_some() || uid.is_some() || gid.is_some() {
                self.op(Op::Attrs {
                    path,
                    mode: None,
                    mtime,
                    uid,
                    gid,
                });
            }
        }
    }

    /// A device, FIFO or socket: itemized as rsync does; there is no op to make one (the
    /// shell skips them), so only attribute changes and deletions of what is in the way
    /// become ops.
    fn special(&mut self, e: &Entry) {
        let x = self.dst.get(e.path.as_str()).copied();
        match x {
            Some(x) if x.kind == Kind::Special => {
                let f = self.attr_flags(e, x);
                if f.any() {
                    self.out.itemized.push(line('.', e, &f));
                    self.op(Op::Attrs {
                        path: e.path.clone(),
                        mode: f.p.then_some(e.mode),
                        mtime: f.t.map(|_| (e.mtime, e.mtime_nsec)),
                        uid: f.o.then_some(e.uid),
                        gid: f.g.then_some(e.gid),
                    });
                }
            }
            Some(x) => {
                if self.make_room(x, "special file") {
                    let f = Flags {
                        new: true,
                        ..Flags::default()
                    };
                    self.out.itemized.push(line('c', e, &f));
                }
            }
            None => {
                let f = Flags {
                    new: true,
                    ..Flags::default()
                };
                self.out.itemized.push(line('c', e, &f));
            }
        }
    }

    /// Removes what the receiver has where a different kind of item goes (rsync logs a
    /// replaced directory's contents, never the replaced item). Without `--delete` a
    /// non-empty directory stays and the new item is not made.
    fn make_room(&mut self, x: &Entry, what: &str) -> bool {
        if x.kind == Kind::Dir {
            let has_kids = self
                .dst_kids
                .get(x.path.as_str())
                .is_some_and(|k| !k.is_empty());
            if has_kids && !self.opts.delete {
                self.out
                    .warnings
                    .push(format!("cannot delete non-empty directory: {}", x.path));
                self.out
                    .errors
                    .push(format!("could not make way for new {what}: {}", x.path));
                return false;
            }
            if !self.delete_contents(&x.path) {
                self.out
                    .warnings
                    .push(format!("cannot delete non-empty directory: {}", x.path));
                self.out
                    .errors
                    .push(format!("could not make way for new {what}: {}", x.path));
                return false;
            }
        }
        self.op(Op::Delete {
            path: x.path.clone(),
            kind: x.kind,
        });
        true
    }

    /// `--delete` in one directory whose contents are transferred: the receiver's entries
    /// that are not in the sender's list for it (by name, whatever their kind) and that no
    /// rule protects, in reverse order.
    fn delete_in_dir(&mut self, dir: &str) {
        let listed: BTreeSet<&str> = self
            .src_kids
            .get(dir)
            .map(|k| {
                k.iter()
                    .filter(|e| !self.excluded(e))
                    .map(|e| e.path.as_str())
                    .collect()
            })
            .unwrap_or_default();
        let kids: Vec<&Entry> = self.dst_kids.get(dir).cloned().unwrap_or_default();
        for &x in kids.iter().rev() {
            if listed.contains(x.path.as_str()) || self.protected(x) {
                continue;
            }
            if x.kind == Kind::Dir && !self.delete_contents(&x.path) {
                self.out
                    .warnings
                    .push(format!("cannot delete non-empty directory: {}", x.path));
                continue;
            }
            self.delete_one(x);
        }
    }

    fn delete_one(&mut self, x: &Entry) {
        let name = if x.kind == Kind::Dir {
            format!("{}/", x.path)
        } else {
            x.path.clone()
        };
        self.out.itemized.push(format!("*deleting   {name}"));
        self.out.deleted += 1;
        self.op(Op::Delete {
            path: x.path.clone(),
            kind: x.kind,
        });
    }

    /// Deletes a receiver's directory's contents (reverse order, depth first); protected
    /// entries stay. Returns whether it is empty afterwards.
    fn delete_contents(&mut self, dir: &str) -> bool {
        let kids: Vec<&Entry> = self.dst_kids.get(dir).cloned().unwrap_or_default();
        let mut empty = true;
        for &x in kids.iter().rev() {
            if self.protected(x) {
                empty = false;
                continue;
            }
            if x.kind == Kind::Dir && !self.delete_contents(&x.path) {
                // rsync says it twice for a nested one (its contents' pass, then rmdir).
                for _ in 0..2 {
                    self.out
                        .warnings
                        .push(format!("cannot delete non-empty directory: {}", x.path));
                }
                empty = false;
                continue;
            }
            self.delete_one(x);
        }
        empty
    }
}
