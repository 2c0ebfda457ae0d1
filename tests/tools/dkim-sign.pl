#!/usr/bin/perl
# Sign the message on standard input with Mail::DKIM (an independent DKIM implementation)
# and print the signed message: the DKIM-Signature header, then the message.
# Usage: dkim-sign.pl DOMAIN SELECTOR KEYFILE < message
use strict;
use warnings;
use Mail::DKIM::Signer;
use Mail::DKIM::TextWrap;

my ($domain, $selector, $keyfile) = @ARGV;
my $signer = Mail::DKIM::Signer->new(
    Algorithm => "rsa-sha256", Method => "relaxed", Domain => $domain,
    Selector => $selector, KeyFile => $keyfile, Headers => "from:to:subject:date");
my @lines;
while (my $line = <STDIN>) {
    $line =~ s/\015?\012$//;
    push @lines, $line;
    $signer->PRINT("$line\015\012");
}
$signer->CLOSE;
print $signer->signature->as_string, "\015\012";
print "$_\015\012" for @lines;
