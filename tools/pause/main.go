// pause is the sandbox ("infrastructure") container of the test node's pods: it holds the pod's
// namespaces open, reaps orphans (it is PID 1 when the pod shares its PID namespace) and exits 0 on
// SIGTERM or SIGINT, as the upstream pause image does. A static binary, so its image needs no libc.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
