// Command bento is Bento (github.com/warpstreamlabs/bento) with only the components the kubemeter
// peer benchmark needs: http_server input, http_client output, pure processors and the sqlite buffer
// (pure-Go modernc.org/sqlite, so it builds with CGO_ENABLED=0). Fewer components, faster build.
package main

import (
	"context"

	"github.com/warpstreamlabs/bento/public/service"

	_ "github.com/warpstreamlabs/bento/public/components/io"
	_ "github.com/warpstreamlabs/bento/public/components/pure"
	_ "github.com/warpstreamlabs/bento/public/components/sql/base"
	_ "modernc.org/sqlite"
)

func main() {
	service.RunCLI(context.Background(), service.CLIOptSetBinaryName("bento"), service.CLIOptSetProductName("Bento"))
}
