// CoreDNS with only the plugins the real node's Corefile uses (e2e/controlplane/real-node):
// CoreDNS's own main links every plugin, and the cloud DNS backends (Azure, AWS, Google),
// tracing and the rest cost minutes of a cold build for nothing here.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
)

func main() { coremain.Run() }
