//! A test certificate authority made with the `openssl` CLI: leaf certificates for servers and
//! clients (subjects, alternative names, key types, an already expired one), and revocation
//! lists.

use std::{
    path::PathBuf,
    process::{Command, Output},
};

pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .expect("openssl and curl (`cargo xtask test` installs them)")
}

pub fn ok(cmd: &mut Command) {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{:?}: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a leaf certificate says.
pub struct Leaf<'a> {
    pub subject: &'a str,
    /// `DNS:a.test`, `URI:spiffe://x`, `email:a@x`, `IP:127.0.0.1`.
    pub sans: &'a [&'a str],
    /// `ec`, `rsa` or `ed25519`.
    pub key: &'a str,
    /// 0: expires as it is issued.
    pub days: u32,
    /// `serverAuth` or `clientAuth`, or empty for none.
    pub usage: &'a str,
}

/// A CA in a temporary directory; `name.pem`/`name.key` for each certificate it issues.
pub struct Pki {
    dir: tempfile::TempDir,
    ca: String,
}

impl Pki {
    /// A CA whose files are `ca.pem`/`ca.key`.
    pub fn new() -> Pki {
        Pki::named("ca", "Portcullis Test CA")
    }

    /// A CA whose files are `name.pem`/`name.key`, with common name `cn`.
    pub fn named(name: &str, cn: &str) -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca: name.to_owned(),
        };
        ok(Command::new("openssl")
            .current_dir(pki.dir.path())
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
            ])
            .args([
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
            ])
            .args(["-days", "2", "-subj", &format!("/CN={cn}")]));
        pki
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// The CA certificate's path.
    pub fn ca(&self) -> PathBuf {
        self.path(&format!("{}.pem", self.ca))
    }

    /// Issues `name.pem` and `name.key` for `dns` names; `key` is `ec`, `rsa` or `ed25519`.
    pub fn issue(&self, name: &str, dns: &[&str], key: &str) {
        let sans: Vec<String> = dns.iter().map(|n| format!("DNS:{n}")).collect();
        let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
        self.issue_leaf(
            name,
            &Leaf {
                subject: &format!("/CN={}", dns[0]),
                sans: &sans,
                key,
                days: 2,
                usage: "",
            },
        );
    }

    pub fn issue_leaf(&self, name: &str, leaf: &Leaf) {
        let d = self.dir.path();
        let genkey: Vec<&str> = match leaf.key {
            "ec" => vec![
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ],
            "rsa" => vec![
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ],
            _ => vec!["genpkey", "-algorithm", "ED25519"],
        };
        ok(Command::new("openssl")
            .current_dir(d)
            .args(&genkey)
            .args(["-out", &format!("{name}.key")]));
        ok(Command::new("openssl")
            .current_dir(d)
            .args(["req", "-new", "-utf8", "-key", &format!("{name}.key")])
            .args(["-out", &format!("{name}.csr"), "-subj", leaf.subject]));
        let mut ext = String::new();
        if !leaf.sans.is_empty() {
            ext += &format!("subjectAltName={}\n", leaf.sans.join(","));
        }
        if !leaf.usage.is_empty() {
            ext += &format!("extendedKeyUsage={}\n", leaf.usage);
        }
        ext += "basicConstraints=CA:FALSE\n";
        std::fs::write(d.join(format!("{name}.ext")), ext).unwrap();
        ok(Command::new("openssl")
            .current_dir(d)
            .args(["x509", "-req", "-in", &format!("{name}.csr")])
            .args(["-CA", &format!("{}.pem", self.ca)])
            .args(["-CAkey", &format!("{}.key", self.ca)])
            .args(["-CAcreateserial", "-days", &leaf.days.to_string()])
            .args(["-out", &format!("{name}.pem")])
            .args(["-extfile", &format!("{name}.ext")]));
    }

    /// Revokes the certificates `names` and writes `crl.pem`.
    pub fn revoke(&self, names: &[&str]) -> PathBuf {
        let d = self.dir.path();
        std::fs::write(
            d.join("ca.cnf"),
            "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\ncrlnumber = crlnumber\n\
             default_md = sha256\ndefault_crl_days = 2\n",
        )
        .unwrap();
        std::fs::write(d.join("index.txt"), "").unwrap();
        std::fs::write(d.join("crlnumber"), "01\n").unwrap();
        let ca = |c: &mut Command| {
            c.current_dir(d)
                .args(["ca", "-config", "ca.cnf"])
                .args(["-keyfile", &format!("{}.key", self.ca)])
                .args(["-cert", &format!("{}.pem", self.ca)]);
        };
        for n in names {
            let mut c = Command::new("openssl");
            ca(&mut c);
            ok(c.args(["-revoke", &format!("{n}.pem")]));
        }
        let mut c = Command::new("openssl");
        ca(&mut c);
        ok(c.args(["-gencrl", "-out", "crl.pem"]));
        d.join("crl.pem")
    }
}
