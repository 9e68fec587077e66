// CoreDNS for the test cluster: the kubernetes plugin and what serves it
// (bind, health, readiness, metrics, cache, logs), and no forward plugin, so a
// name outside the cluster gets an answer from here or none: no query
// leaves the machine.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The plugins this build has, in the order of CoreDNS's own plugin.cfg.
func init() {
	dnsserver.Directives = []string{"bind", "ready", "health", "prometheus", "errors", "log", "cache", "kubernetes"}
}

func main() {
	coremain.Run()
}
