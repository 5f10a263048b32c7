//! Resolving `ExecStart.user` against the sandbox's own `/etc/passwd` and
//! `/etc/group`.
//!
//! Parsed by hand: the agent is a static binary and must see the sandbox
//! image's accounts, not whatever NSS configuration the libc would consult.

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// One line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (always includes `gid`).
    pub groups: Vec<u32>,
    /// From the passwd entry, or "/" when there is none.
    pub home: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("user {0:?} not found in the sandbox's /etc/passwd")]
    UnknownUser(String),
    #[error("group {0:?} not found in the sandbox's /etc/group")]
    UnknownGroup(String),
    #[error("invalid user {0:?}; use \"name\", \"uid\", \"uid:gid\" or \"name:group\"")]
    Invalid(String),
}

/// Parses passwd(5) text; malformed lines are skipped.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

/// Parses group(5) text; malformed lines are skipped.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            let members = f[3]
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect();
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
                members,
            })
        })
        .collect()
}

/// Resolves `spec` ("", "name", "uid", "uid:gid", "name:group", ...).
pub fn resolve(
    spec: &str,
    passwd: &[PasswdEntry],
    groups: &[GroupEntry],
) -> Result<Identity, UserError> {
    let spec = spec.trim();
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if group == Some("") || (user.is_empty() && group.is_some()) {
        return Err(UserError::Invalid(spec.to_string()));
    }
    let user = if user.is_empty() { "0" } else { user };

    let entry = match user.parse::<u32>() {
        Ok(uid) => passwd.iter().find(|p| p.uid == uid).cloned(),
        Err(_) => Some(
            passwd
                .iter()
                .find(|p| p.name == user)
                .cloned()
                .ok_or_else(|| UserError::UnknownUser(user.to_string()))?,
        ),
    };
    let uid = match &entry {
        Some(e) => e.uid,
        // Numeric and absent from passwd: allowed, like Docker (gid 0, home /).
        None => user
            .parse::<u32>()
            .map_err(|_| UserError::UnknownUser(user.to_string()))?,
    };
    let gid = match group {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| UserError::UnknownGroup(g.to_string()))?,
        },
        None => entry.as_ref().map(|e| e.gid).unwrap_or(0),
    };
    let mut supplementary = vec![gid];
    if let Some(e) = &entry {
        for g in groups
            .iter()
            .filter(|g| g.members.iter().any(|m| m == &e.name))
        {
            if !supplementary.contains(&g.gid) {
                supplementary.push(g.gid);
            }
        }
    }
    let home = entry
        .map(|e| e.home)
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/".to_string());
    Ok(Identity {
        uid,
        gid,
        groups: supplementary,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # comment\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        broken line\n\
        alice:x:1000:1000:Alice,,,:/home/alice:/bin/bash\n\
        nohome:x:1001:1001:::/bin/sh\n";
    const GROUP: &str = "root:x:0:\n\
        wheel:x:10:alice, bob\n\
        alice:x:1000:\n\
        docker:x:999:alice\n\
        bad:x:notanumber:\n";

    fn res(spec: &str) -> Result<Identity, UserError> {
        resolve(spec, &parse_passwd(PASSWD), &parse_group(GROUP))
    }

    #[test]
    fn parses_files() {
        let p = parse_passwd(PASSWD);
        assert_eq!(p.len(), 4);
        assert_eq!(
            p[2],
            PasswdEntry {
                name: "alice".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/alice".into()
            }
        );
        let g = parse_group(GROUP);
        assert_eq!(g.len(), 4);
        assert_eq!(g[1].members, vec!["alice".to_string(), "bob".to_string()]);
    }

    #[test]
    fn default_is_root() {
        let id = res("").unwrap();
        assert_eq!((id.uid, id.gid, id.home.as_str()), (0, 0, "/root"));
        assert_eq!(id.groups, vec![0]);
    }

    #[test]
    fn by_name_with_supplementary_groups() {
        let id = res("alice").unwrap();
        assert_eq!(
            (id.uid, id.gid, id.home.as_str()),
            (1000, 1000, "/home/alice")
        );
        assert_eq!(id.groups, vec![1000, 10, 999]);
    }

    #[test]
    fn numeric_forms() {
        assert_eq!(res("1000").unwrap().home, "/home/alice");
        let id = res("4242").unwrap();
        assert_eq!((id.uid, id.gid, id.home.as_str()), (4242, 0, "/"));
        let id = res("4242:77").unwrap();
        assert_eq!((id.uid, id.gid), (4242, 77));
        assert_eq!(res("1001").unwrap().home, "/");
    }

    #[test]
    fn name_and_group() {
        let id = res("alice:wheel").unwrap();
        assert_eq!((id.uid, id.gid), (1000, 10));
        assert!(id.groups.contains(&999));
        let id = res("daemon:0").unwrap();
        assert_eq!((id.uid, id.gid), (1, 0));
    }

    #[test]
    fn errors_name_the_culprit() {
        assert_eq!(
            res("mallory"),
            Err(UserError::UnknownUser("mallory".into()))
        );
        assert_eq!(
            res("alice:nogroup"),
            Err(UserError::UnknownGroup("nogroup".into()))
        );
        assert!(matches!(res("alice:"), Err(UserError::Invalid(_))));
        assert!(matches!(res(":0"), Err(UserError::Invalid(_))));
        assert!(res("mallory").unwrap_err().to_string().contains("mallory"));
    }
}
