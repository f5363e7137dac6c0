// CoreDNS with only the plugins its Corefiles here use: the real node's (e2e/controlplane/real-node)
// and the one kubeadm writes for a kind cluster (errors, health, ready, kubernetes, prometheus,
// forward, cache, loop, reload, loadbalance). CoreDNS's own main links every plugin, and the
// cloud DNS backends (Azure, AWS, Google), tracing and the rest cost minutes of a cold build for
// nothing here.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

func main() { coremain.Run() }
