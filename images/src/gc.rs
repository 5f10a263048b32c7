//! Garbage collection planning: which records, blobs and root disks go.
//!
//! First whatever no record references (blobs left by an interrupted
//! pull, disks of images whose tag moved or of another root file system
//! format), then, while the cache is over its budget, whole images, least
//! recently used first. An image is never removed while protected (a
//! sandbox holds a lease on it, or a pull or build is using it), and a
//! blob or disk goes only when no remaining image needs it.
//!
//! Planning is a pure function of a snapshot, so the store runs it under
//! its state lock and the rules are unit-tested here.

use std::collections::{HashMap, HashSet};

use crate::digest::Digest;
use crate::records::Record;

pub(crate) struct Snapshot<'a> {
    pub records: &'a HashMap<String, Record>,
    /// Manifest digests leased by sandboxes or pinned by a build.
    pub protected_manifests: &'a HashSet<Digest>,
    /// Blobs a pull or build in progress uses.
    pub pinned_blobs: &'a HashSet<Digest>,
    /// Blobs present, with their sizes.
    pub blob_files: &'a HashMap<Digest, u64>,
    /// Root disks present (of the store's format), with their allocated
    /// sizes, by manifest digest.
    pub disk_files: &'a HashMap<Digest, u64>,
    /// `None`: only unreferenced things are removed.
    pub budget: Option<u64>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Records to remove, in the order chosen (least recently used first).
    pub records: Vec<String>,
    pub blobs: Vec<Digest>,
    pub disks: Vec<Digest>,
    pub freed_bytes: u64,
    /// Cache usage once the plan is carried out.
    pub usage_after: u64,
}

pub(crate) fn plan(s: &Snapshot<'_>) -> Plan {
    let mut blob_refs: HashMap<Digest, usize> = HashMap::new();
    let mut disk_refs: HashMap<Digest, usize> = HashMap::new();
    for r in s.records.values() {
        for d in r.blob_digests() {
            *blob_refs.entry(d).or_default() += 1;
        }
        *disk_refs.entry(r.digest()).or_default() += 1;
    }
    let mut plan = Plan::default();
    let mut usage: u64 = s.blob_files.values().sum::<u64>() + s.disk_files.values().sum::<u64>();

    // Unreferenced things, whatever the budget.
    let mut orphan_blobs: Vec<&Digest> = s
        .blob_files
        .keys()
        .filter(|d| !blob_refs.contains_key(*d) && !s.pinned_blobs.contains(*d))
        .collect();
    orphan_blobs.sort();
    for d in orphan_blobs {
        plan.blobs.push(d.clone());
        plan.freed_bytes += s.blob_files[d];
    }
    let mut orphan_disks: Vec<&Digest> = s
        .disk_files
        .keys()
        .filter(|d| !disk_refs.contains_key(*d) && !s.protected_manifests.contains(*d))
        .collect();
    orphan_disks.sort();
    for d in orphan_disks {
        plan.disks.push(d.clone());
        plan.freed_bytes += s.disk_files[d];
    }
    usage -= plan.freed_bytes;

    if let Some(budget) = s.budget {
        let mut candidates: Vec<&Record> = s
            .records
            .values()
            .filter(|r| !s.protected_manifests.contains(&r.digest()))
            .collect();
        candidates
            .sort_by(|a, b| (a.last_used_ns, &a.reference).cmp(&(b.last_used_ns, &b.reference)));
        for r in candidates {
            if usage <= budget {
                break;
            }
            plan.records.push(r.reference.clone());
            let mut freed = 0;
            for d in r.blob_digests() {
                let Some(n) = blob_refs.get_mut(&d) else {
                    continue;
                };
                *n -= 1;
                if *n == 0
                    && !s.pinned_blobs.contains(&d)
                    && let Some(size) = s.blob_files.get(&d)
                {
                    freed += size;
                    plan.blobs.push(d);
                }
            }
            let digest = r.digest();
            if let Some(n) = disk_refs.get_mut(&digest) {
                *n -= 1;
                if *n == 0
                    && let Some(size) = s.disk_files.get(&digest)
                {
                    freed += size;
                    plan.disks.push(digest);
                }
            }
            plan.freed_bytes += freed;
            usage -= freed;
        }
    }
    plan.usage_after = usage;
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::RecordSource;

    fn d(s: &str) -> Digest {
        Digest::of(s.as_bytes())
    }

    fn rec(name: &str, manifest: &str, blobs: &[&str], last_used: u64) -> Record {
        let mut r = Record::new(
            name.into(),
            RecordSource::Registry {
                registry: "r".into(),
                repository: name.into(),
            },
            &d(manifest),
            1,
            blobs.iter().map(|b| (d(b), 100)).collect(),
            0,
        );
        r.last_used_ns = last_used;
        r
    }

    #[test]
    fn lru_down_to_budget_keeping_protected_and_shared() {
        let records: HashMap<String, Record> = [
            rec("old", "m1", &["base", "a"], 1),
            rec("leased", "m2", &["base", "b"], 0),
            rec("mid", "m3", &["base", "c"], 2),
            rec("new", "m4", &["base", "e"], 3),
        ]
        .into_iter()
        .map(|r| (r.reference.clone(), r))
        .collect();
        let blob_files: HashMap<Digest, u64> = ["base", "a", "b", "c", "e", "stray"]
            .iter()
            .map(|b| (d(b), 100))
            .collect();
        let disk_files: HashMap<Digest, u64> =
            [("m1", 50), ("m2", 50), ("m3", 50), ("m4", 50), ("gone", 50)]
                .iter()
                .map(|(m, n)| (d(m), *n))
                .collect();
        let protected: HashSet<Digest> = [d("m2")].into();
        let pinned: HashSet<Digest> = HashSet::new();
        // Total: 600 blobs + 250 disks. Orphans: stray (100), disk gone (50).
        let snap = |budget| Snapshot {
            records: &records,
            protected_manifests: &protected,
            pinned_blobs: &pinned,
            blob_files: &blob_files,
            disk_files: &disk_files,
            budget,
        };
        let p = plan(&snap(None));
        assert!(p.records.is_empty());
        assert_eq!(p.blobs, vec![d("stray")]);
        assert_eq!(p.disks, vec![d("gone")]);
        assert_eq!(p.usage_after, 700);

        // 700 -> at most 560: dropping "old" frees a + m1 = 150 -> 550.
        let p = plan(&snap(Some(560)));
        assert_eq!(p.records, vec!["old".to_string()]);
        assert!(p.blobs.contains(&d("a")) && !p.blobs.contains(&d("base")));
        assert_eq!(p.usage_after, 550);

        // A tiny budget removes all but the leased image; shared "base"
        // stays because the leased image needs it.
        let p = plan(&snap(Some(0)));
        assert_eq!(
            p.records,
            vec!["old".to_string(), "mid".into(), "new".into()]
        );
        assert!(!p.blobs.contains(&d("base")) && !p.blobs.contains(&d("b")));
        assert!(!p.disks.contains(&d("m2")));
        assert_eq!(p.usage_after, 250);
    }

    #[test]
    fn pinned_blobs_survive() {
        let records = HashMap::new();
        let blob_files: HashMap<Digest, u64> = [(d("x"), 10), (d("y"), 10)].into();
        let pinned: HashSet<Digest> = [d("x")].into();
        let p = plan(&Snapshot {
            records: &records,
            protected_manifests: &HashSet::new(),
            pinned_blobs: &pinned,
            blob_files: &blob_files,
            disk_files: &HashMap::new(),
            budget: Some(0),
        });
        assert_eq!(p.blobs, vec![d("y")]);
    }
}
