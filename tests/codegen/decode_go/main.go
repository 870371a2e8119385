// Command decode round-trips captured eglo messages through the Go models Modelina generated.
//
//	OUT_DIR/go/decode-go MESSAGES_DIR
//
// generate.mjs copies this file to OUT_DIR/go/decode/ beside routes.go (which names the generated
// types of package models, module "eglomodels"); `go build ./decode` needs the standard library
// only. Every MESSAGES_DIR/*.json is {"routing_key", "properties", "body"}; the body's event_type
// picks the model, json.Unmarshal into it and json.Marshal back out, and every field of the body
// that is missing or changed after the round trip is reported (numbers compared numerically).
// Prints one JSON line: {"decoder": "go", "messages", "decoded", "lossless", "lossy", ...}.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
)

// route sends event types to a generated model: a pattern ending in "." is a prefix.
type route struct {
	pattern string
	model   string
	make    func() any // nil: the document has no such model
}

type failure struct {
	File      string   `json:"file"`
	EventType string   `json:"event_type"`
	Model     *string  `json:"model"`
	Error     string   `json:"error,omitempty"`
	Paths     []string `json:"paths"`
}

type summary struct {
	Decoder    string         `json:"decoder"`
	Messages   int            `json:"messages"`
	Decoded    int            `json:"decoded"`
	Lossless   int            `json:"lossless"`
	Lossy      int            `json:"lossy"`
	LostFields map[string]int `json:"lost_fields"`
	Failures   []failure      `json:"failures"`
}

const (
	maxPaths    = 8
	maxFailures = 10
)

var (
	indices = regexp.MustCompile(`\[\d+\]`)
	remark  = regexp.MustCompile(` \(.*$`)
)

// parse reads JSON keeping numbers as json.Number, so nothing is rounded before comparing.
func parse(raw []byte) (any, error) {
	decoder := json.NewDecoder(bytes.NewReader(raw))
	decoder.UseNumber()
	var value any
	err := decoder.Decode(&value)
	return value, err
}

func describe(value any, present bool) string {
	if !present {
		return "missing"
	}
	raw, _ := json.Marshal(value)
	text := string(raw)
	if len(text) > 60 {
		text = text[:57] + "..."
	}
	return text
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func sameNumber(a, b json.Number) bool {
	x, okX := new(big.Float).SetString(string(a))
	y, okY := new(big.Float).SetString(string(b))
	return okX && okY && x.Cmp(y) == 0
}

// lost appends every path of original that is missing from other or differs there.
func lost(original, other any, present bool, path string, out *[]string) {
	if !present {
		*out = append(*out, path+" (missing)")
		return
	}
	switch o := original.(type) {
	case map[string]any:
		c, ok := other.(map[string]any)
		if !ok {
			*out = append(*out, fmt.Sprintf("%s (%s instead of an object)", path, describe(other, true)))
			return
		}
		keys := make([]string, 0, len(o))
		for key := range o {
			keys = append(keys, key)
		}
		sort.Strings(keys)
		for _, key := range keys {
			value, ok := c[key]
			lost(o[key], value, ok, join(path, key), out)
		}
	case []any:
		c, ok := other.([]any)
		if !ok {
			*out = append(*out, fmt.Sprintf("%s (%s instead of an array)", path, describe(other, true)))
			return
		}
		if len(c) != len(o) {
			*out = append(*out, fmt.Sprintf("%s (%d items instead of %d)", path, len(c), len(o)))
		}
		for i, item := range o {
			lost(item, itemAt(c, i), i < len(c), fmt.Sprintf("%s[%d]", path, i), out)
		}
	case json.Number:
		if c, ok := other.(json.Number); !ok || !sameNumber(o, c) {
			*out = append(*out, fmt.Sprintf("%s (%s instead of %s)", path, describe(other, true), o))
		}
	default:
		if original != other {
			*out = append(*out, fmt.Sprintf(
				"%s (%s instead of %s)", path, describe(other, true), describe(original, true)))
		}
	}
}

func itemAt(items []any, i int) any {
	if i < len(items) {
		return items[i]
	}
	return nil
}

func find(eventType string) *route {
	for i := range routes {
		r := &routes[i]
		if strings.HasSuffix(r.pattern, ".") && strings.HasPrefix(eventType, r.pattern) ||
			eventType == r.pattern {
			return r
		}
	}
	return nil
}

// roundTrip decodes body into a new model and encodes it again. A JSON value of the wrong type for
// its field does not stop encoding/json (it skips the field), so the copy comes back with the
// error and what survived can still be compared.
func roundTrip(r *route, body json.RawMessage) (out []byte, err error) {
	defer func() {
		if p := recover(); p != nil {
			out, err = nil, fmt.Errorf("panic: %v", p)
		}
	}()
	target := r.make()
	decodeErr := json.Unmarshal(body, target)
	var typeErr *json.UnmarshalTypeError
	if decodeErr != nil && !errors.As(decodeErr, &typeErr) {
		return nil, decodeErr
	}
	if out, err = json.Marshal(target); err != nil {
		return nil, err
	}
	return out, decodeErr
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: decode-go MESSAGES_DIR")
		os.Exit(2)
	}
	files, err := filepath.Glob(filepath.Join(os.Args[1], "*.json"))
	if err != nil {
		panic(err)
	}
	sort.Strings(files)
	result := summary{Decoder: "go", Messages: len(files), LostFields: map[string]int{}}
	failures := []failure{}
	for _, file := range files {
		raw, err := os.ReadFile(file)
		if err != nil {
			panic(err)
		}
		var message struct {
			Body json.RawMessage `json:"body"`
		}
		if err := json.Unmarshal(raw, &message); err != nil {
			panic(fmt.Sprintf("%s: %v", file, err))
		}
		var head struct {
			EventType string `json:"event_type"`
		}
		_ = json.Unmarshal(message.Body, &head)
		name := filepath.Base(file)
		r := find(head.EventType)
		if r == nil || r.make == nil {
			var model *string
			if r != nil {
				model = &r.model
			}
			failures = append(failures, failure{name, head.EventType, model, "no model", []string{}})
			continue
		}
		model := r.model
		copied, decodeErr := roundTrip(r, message.Body)
		if copied == nil {
			failures = append(failures, failure{name, head.EventType, &model, decodeErr.Error(), []string{}})
			continue
		}
		original, err := parse(message.Body)
		if err != nil {
			panic(fmt.Sprintf("%s: %v", file, err))
		}
		again, err := parse(copied)
		if err != nil {
			failures = append(failures, failure{name, head.EventType, &model, err.Error(), []string{}})
			continue
		}
		paths := []string{}
		lost(original, again, true, "", &paths)
		switch {
		case decodeErr != nil:
			failures = append(failures, failure{name, head.EventType, &model, decodeErr.Error(), paths})
		case len(paths) > 0:
			result.Decoded++
			failures = append(failures, failure{name, head.EventType, &model, "", paths})
		default:
			result.Decoded++
			result.Lossless++
		}
	}
	for _, f := range failures {
		fields := map[string]bool{}
		for _, path := range f.Paths {
			fields[remark.ReplaceAllString(indices.ReplaceAllString(path, "[]"), "")] = true
		}
		switch {
		case f.Error == "no model":
			fields["<no model for "+f.EventType+">"] = true
		case f.Error != "":
			fields["<"+*f.Model+" does not decode>"] = true
		}
		for field := range fields {
			result.LostFields[field]++
		}
	}
	result.Lossy = result.Messages - result.Lossless
	if len(failures) > maxFailures {
		failures = failures[:maxFailures]
	}
	for i := range failures {
		if len(failures[i].Paths) > maxPaths {
			failures[i].Paths = failures[i].Paths[:maxPaths]
		}
	}
	result.Failures = failures
	out, err := json.Marshal(result)
	if err != nil {
		panic(err)
	}
	fmt.Println(string(out))
}
