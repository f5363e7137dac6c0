//! A client and a namespace from kubectl's flags, resolved the way kubectl resolves them.

use anyhow::{Context as _, Result};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::cli::Connection;

pub async fn connect(c: &Connection) -> Result<(Client, String)> {
    let options = KubeConfigOptions {
        context: c.context.clone(),
        ..Default::default()
    };
    let config = match &c.kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read the kubeconfig {} (--kubeconfig)", path.display()))?;
            Config::from_custom_kubeconfig(file, &options)
                .await
                .with_context(|| format!("the kubeconfig {} (--kubeconfig)", path.display()))?
        }
        // $KUBECONFIG (a list of files, merged), ~/.kube/config, else in-cluster.
        None if c.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .context("cannot load the kubeconfig ($KUBECONFIG or ~/.kube/config) for --context")?,
        None => Config::infer().await.context(
            "no cluster to talk to: set $KUBECONFIG or --kubeconfig (or run in a pod with a service account)",
        )?,
    };
    let namespace = c
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).context("cannot make a client of the kubeconfig")?;
    Ok((client, namespace))
}
